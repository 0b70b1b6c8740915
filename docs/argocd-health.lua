-- Argo CD health check for lorajob.dev/LoRAJob.
--
-- Install it under resource.customizations.health.lorajob.dev_LoRAJob in argocd-cm
-- (see docs/gitops.md). It reads only status, which the operator owns:
--   Succeeded            -> Healthy   (the adapter is in storage)
--   Failed               -> Degraded  (status.message says why)
--   Suspended            -> Suspended (spec.runPolicy.suspend: true)
--   anything else        -> Progressing (Pending, Queued, Scheduling, Running, Uploading)
-- A status computed from an older spec generation is still Progressing: the operator has
-- not yet acted on what Git now says.
local hs = {}

local function progress_text(status)
  local p = status.progress
  if p == nil or p.step == nil then
    return ""
  end
  local text = " (step " .. tostring(p.step)
  if p.totalSteps ~= nil then
    text = text .. "/" .. tostring(p.totalSteps)
  end
  if p.loss ~= nil then
    text = text .. ", loss " .. string.format("%.4g", p.loss)
  end
  return text .. ")"
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to plan the job"
  return hs
end

local status = obj.status
local phase = status.phase
local message = status.message or phase

if obj.metadata ~= nil and obj.metadata.generation ~= nil and status.observedGeneration ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "The operator has not yet observed generation " .. tostring(obj.metadata.generation)
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  if status.result ~= nil and status.result.adapterUri ~= nil then
    message = "Adapter at " .. status.result.adapterUri
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
  message = message .. progress_text(status)
end
hs.message = message
return hs
