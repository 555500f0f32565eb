"""Shared test settings: seeded hypothesis profiles (CI runs >= 1000 examples per property); the
user cache ($XDG_CACHE_HOME: cached checkpoints, the CLI's compilation cache) in a temporary folder."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=1000, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---- synthetic checkpoints (ref.synth): the tiny preset, calibrated, in both expert layouts -----
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Tiny random checkpoint, per-expert NVFP4 layout, seed 0, sharded with an index."""
    from ref.synth import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0, expert_layout="per-expert")


@pytest.fixture(scope="session")
def tiny_checkpoint_fused(tmp_path_factory):
    """The same weights as tiny_checkpoint, in the fused 3-D expert layout."""
    from ref.synth import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_fused", "tiny", seed=0, expert_layout="fused")
