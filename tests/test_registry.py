import pytest

from mlx_lora_api import errors, registry
from mlx_lora_api.registry import Registry
from mlx_lora_api.tasks import checks
from mlx_lora_api.types import BaseModel

BAD_IDS = [
    "..",
    "../x",
    "a/b",
    "/abs",
    "a\x00b",
    "A-Upper",
    "-dash",
    ".hidden",
    "x" * 97,
    "café",
    "a..b",
    "",
    "a b",
    "ｆｕｌｌｗｉｄｔｈ",
    "a\\b",
    "trailing-newline\n",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_that_could_leave_their_folder_are_refused(bad):
    with pytest.raises(errors.Invalid, match="is not a valid id"):
        registry.check_id(bad)


def test_good_ids_pass():
    for good in ["a", "smollm2-135m-instruct", "x.y_z-1", "0" * 96]:
        assert registry.check_id(good) == good


def test_staged_folder_appears_only_when_complete(tmp_path):
    final = tmp_path / "models" / "m1"
    with pytest.raises(RuntimeError), registry.staged(final) as work:
        (work / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not final.exists()
    assert list((tmp_path / "models" / ".staging").iterdir()) == []
    with registry.staged(final) as work:
        (work / "whole.bin").write_bytes(b"x")
        assert not final.exists()
    assert (final / "whole.bin").exists()


def test_base_model_resolution_order(data_dir, tmp_path):
    reg = Registry(data_dir, "tiny-base", [tmp_path])
    assert reg.resolve_base("default") == BaseModel("tiny-base", "registry", str(data_dir / "models/tiny-base"))
    assert reg.resolve_base("tiny-base").source == "registry"
    folder = reg.resolve_base(str(data_dir / "models" / "tiny-base"))
    assert folder.source == "path"
    seen = []
    hub = reg.resolve_base("org/repo", hub_lookup=lambda ref: seen.append(ref) or "/cache/org/repo")
    assert hub == BaseModel("org/repo", "hub", "/cache/org/repo") and seen == ["org/repo"]


def test_unknown_and_forbidden_base_models(data_dir, tmp_path):
    reg = Registry(data_dir, "tiny-base", [])
    with pytest.raises(errors.NotFound, match="local models: tiny-base"):
        reg.resolve_base("no-such-model")
    with pytest.raises(errors.Forbidden, match="outside the allowed model roots"):
        reg.resolve_base("/etc")

    def offline(ref):
        raise errors.Unavailable(f"{ref!r} is not in the local Hugging Face cache and the Hub cannot be reached")

    with pytest.raises(errors.Unavailable, match="Hub cannot be reached; local models: tiny-base"):
        reg.resolve_base("org/repo", hub_lookup=offline)
    empty = Registry(tmp_path / "empty", "smollm2")
    with pytest.raises(errors.NotFound, match="import-gguf --bundled"):
        empty.resolve_base("default")


def test_listing_skips_staging_and_reports_kinds(data_dir):
    reg = Registry(data_dir, "tiny-base")
    (data_dir / "models" / ".staging" / "half").mkdir(parents=True)
    records = reg.list_models()
    assert [(r.model_id, r.kind) for r in records] == [("tiny-base", "base")]
    assert records[0].size_bytes > 0
    assert reg.record("tiny-base").files
    with pytest.raises(errors.NotFound):
        reg.record("nothing-here")


def test_damaged_weights_are_named_before_mlx_reads_them(tmp_path, tiny_model_template):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_template, folder)
    checks.check_model_folder(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    for damaged, reason in [
        (data[:-10], "truncated"),
        (data[:4], "too short"),
        (b"\xff" * 8 + data[8:], "header needs"),
    ]:
        weights.write_bytes(damaged)
        with pytest.raises(checks.DamagedArtifact, match=f"model.safetensors.*{reason}"):
            checks.check_model_folder(folder)
    weights.write_bytes(data)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(checks.DamagedArtifact, match="has no tokenizer"):
        checks.check_model_folder(folder)


def test_a_damaged_meta_json_is_listed_as_damaged_with_the_reason(data_dir):
    """Hidden before, the folder still took its disk space and could not be found to fix."""
    (data_dir / "models" / "tiny-base" / "meta.json").write_text("{not json")
    reg = Registry(data_dir, "tiny-base")
    listed = {r.model_id: r for r in reg.list_models()}
    assert listed["tiny-base"].status == "damaged" and "meta.json is damaged" in listed["tiny-base"].problem
    assert reg.record("tiny-base").status == "damaged" and reg.record("tiny-base").files


def test_a_model_deleted_while_the_registry_reads_it_is_gone_not_an_error(data_dir, monkeypatch):
    from mlx_lora_api.registry import registry as registry_module

    real = registry_module.folder_size

    def deleted_meanwhile(folder):
        if folder.name == "tiny-base":
            raise FileNotFoundError(folder)  # as rglob/stat see a folder removed under them
        return real(folder)

    monkeypatch.setattr(registry_module, "folder_size", deleted_meanwhile)
    reg = Registry(data_dir, "tiny-base")
    assert [r.model_id for r in reg.list_models()] == []  # was a 500
    with pytest.raises(errors.NotFound):
        reg.record("tiny-base")
