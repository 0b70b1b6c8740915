"""The committed CRD and README reference are exactly what `make crds` writes, and carry
what users and `kubectl` rely on."""

from __future__ import annotations

from pathlib import Path

import yaml

from lora_operator import crd

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crd_is_generated() -> None:
    assert (ROOT / "crds/lorajob.yaml").read_text() == crd.render_crd(), "run `make crds`"


def test_readme_reference_is_generated() -> None:
    readme = (ROOT / "README.md").read_text()
    assert crd.splice_readme(readme) == readme, "run `make crds`"


def test_crd_has_what_kubectl_shows() -> None:
    doc = yaml.safe_load((ROOT / "crds/lorajob.yaml").read_text())
    spec = doc["spec"]
    assert spec["names"]["shortNames"] == ["lj"] and "ml" in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns)[:7] == ["Phase", "Model", "Method", "VRAM", "Progress", "Loss", "Age"]
    assert columns["Adapter"]["priority"] == 1 and columns["Node"]["priority"] == 1
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert schema["properties"]["lora"]["properties"]["r"]["description"]
    rules = [r["rule"] for r in schema["properties"]["training"]["x-kubernetes-validations"]]
    assert "!(has(self.epochs) && has(self.maxSteps))" in rules
    immutable = [name for name, prop in schema["properties"].items()
                 if any(r["rule"] == "self == oldSelf"
                        for r in prop.get("x-kubernetes-validations", []))]
    assert "runPolicy" not in immutable and {"baseModel", "training", "resources"} <= set(immutable)


def test_every_field_has_a_description() -> None:
    schema = crd.spec_schema()["properties"]["spec"]
    missing: list[str] = []

    def walk(node: dict, path: str) -> None:  # type: ignore[type-arg]
        for key, child in node.get("properties", {}).items():
            if not child.get("description"):
                missing.append(f"{path}.{key}")
            walk(child, f"{path}.{key}")
            if "items" in child:
                walk(child["items"], f"{path}.{key}[]")

    walk(schema, "spec")
    assert missing == []
