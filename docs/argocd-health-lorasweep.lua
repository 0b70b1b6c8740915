-- Argo CD health check for lorajob.dev/LoRASweep.
--
-- Install it under resource.customizations.health.lorajob.dev_LoRASweep in argocd-cm
-- (see docs/gitops.md). It reads only status, which the operator owns:
--   Succeeded            -> Healthy     (every trial finished, one succeeded: the best adapter is named)
--   Failed               -> Degraded    (no trial succeeded, or the spec was refused; status.message says why)
--   anything else        -> Progressing (trials pending or running; "Trials 2/4" in the message)
-- A status computed from an older spec generation is still Progressing.
local hs = {}

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to start the sweep"
  return hs
end

local status = obj.status
local message = status.message or status.phase

if obj.metadata ~= nil and obj.metadata.generation ~= nil and status.observedGeneration ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "The operator has not yet observed generation " .. tostring(obj.metadata.generation)
  return hs
end

if status.phase == "Succeeded" then
  hs.status = "Healthy"
  local best = status.bestTrial
  if best ~= nil and best.name ~= nil then
    message = "Best trial " .. best.name
    if best.adapterEvalLoss ~= nil then
      message = message .. " (held-out loss " .. string.format("%.4g", best.adapterEvalLoss) .. ")"
    end
    if best.adapterUri ~= nil then
      message = message .. ", adapter at " .. best.adapterUri
    end
  end
elseif status.phase == "Failed" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
  if status.trialProgress ~= nil then
    message = "Trials " .. status.trialProgress .. " finished: " .. message
  end
end
hs.message = message
return hs
