from pydantic import BaseModel

from gridistill.stages import ArtifactRef, StoreSpec, run_stage, stage_key


class Params(BaseModel):
    size: int = 1
    device: str = "cpu"
    progress: bool = True


def ref(key: str) -> ArtifactRef:
    return ArtifactRef(stage="up", scope="all", key=key, folder=f"up/all/{key}")


def test_key_depends_on_what_changes_the_result_only():
    base = stage_key("s", "v1", "alpha", Params(), [ref("u1")])
    assert base != stage_key("s", "v1", "beta", Params(), [ref("u1")])  # per-class artifacts
    assert base != stage_key("s", "v2", "alpha", Params(), [ref("u1")])  # code version
    assert base != stage_key("s", "v1", "alpha", Params(size=2), [ref("u1")])
    assert base != stage_key("s", "v1", "alpha", Params(), [ref("u2")])  # upstream content
    assert base == stage_key("s", "v1", "alpha", Params(device="cuda", progress=False),
                             [ref("u1")])


def test_run_stage_computes_once_then_reuses(tmp_path):
    calls = []

    def compute(store, folder, scope, params, upstream):
        calls.append(scope)
        store.write_text(f"{folder}/out.txt", f"{scope}:{params.size}")
        return {"n": 1}

    spec = StoreSpec(root=str(tmp_path))
    first = run_stage("demo", compute, spec, "alpha", Params(), [])
    second = run_stage("demo", compute, spec, "alpha", Params(), [])
    assert calls == ["alpha"] and first.folder == second.folder and second.meta == {"n": 1}
    assert spec.open().read_bytes(f"{first.folder}/out.txt") == b"alpha:1"


def test_a_commit_removed_by_a_concurrent_forced_run_means_recompute(tmp_path, monkeypatch):
    """Another run forcing this stage can remove the commit marker at any moment, also right
    before this run reads it: this run must then recompute, not fail."""
    from gridistill.storage import COMMIT_MARKER, RunStore

    calls = []

    def compute(store, folder, scope, params, upstream):
        calls.append(scope)
        store.write_text(f"{folder}/out.txt", scope)
        return {"n": len(calls)}

    spec = StoreSpec(root=str(tmp_path))
    first = run_stage("demo", compute, spec, "alpha", Params(), [])
    read_json = RunStore.read_json

    def uncommitted_just_before(self, path):
        if path.endswith(COMMIT_MARKER) and len(calls) == 1:
            self.uncommit(first.folder)  # the other run, between any check and this read
        return read_json(self, path)

    monkeypatch.setattr(RunStore, "read_json", uncommitted_just_before)
    again = run_stage("demo", compute, spec, "alpha", Params(), [])
    assert calls == ["alpha", "alpha"] and again.meta == {"n": 2}
    assert spec.open().is_committed(again.folder)
    spec.open().uncommit(again.folder)
    spec.open().uncommit(again.folder)  # twice: a no-op, as when two runs force at once
