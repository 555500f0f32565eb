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


@pytest.fixture(scope="session")
def tiny_checkpoint_mixed(tmp_path_factory):
    """NVIDIA's "-V2" layout (ref.synth --variant modelopt-mixed): FP8 dense linears with input scales,
    NVFP4 experts, FP8 KV scales; the same weights as tiny_checkpoint."""
    from ref.synth import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "mixed", "tiny", seed=0, variant="modelopt-mixed")


@pytest.fixture(scope="session")
def tiny_checkpoint_ct(tmp_path_factory):
    """compressed-tensors NVFP4 (ref.synth --variant compressed-tensors): quantized DeltaNet and attention
    projections, inverted globals; the same weights as tiny_checkpoint."""
    from ref.synth import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "ct", "tiny", seed=0, variant="compressed-tensors")
