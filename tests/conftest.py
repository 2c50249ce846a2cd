"""Test setup: 8 host CPU devices for the sharding tests, and a CI-sized hypothesis profile."""

import os

# Must happen before JAX initializes its backends (conftest is imported before the test modules).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny rewired and a tiny baseline model trained for a few steps on local files:
    ``{"rewired": workdir, "baseline": workdir}``, trained once per test session."""
    import json

    import jax

    from runway_jax.config import model_preset
    from runway_jax.data import DataConfig
    from runway_jax.training import TrainConfig, train_and_evaluate

    root = tmp_path_factory.mktemp("trained")
    texts = [("line %d of document %d. " % (i, d)) * 40 for d in range(6) for i in range(3)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    workdirs = {}
    for name, rewire in (("rewired", True), ("baseline", False)):
        config = TrainConfig(model=model_preset("tiny", rewire=rewire),
                             data=DataConfig(source=str(corpus), validation_source=str(corpus),
                                             seq_len=32, batch_size=4),
                             steps=6, checkpoint_every=6, eval_every=6, eval_batches=1, log_every=6)
        workdirs[name] = root / name
        train_and_evaluate(config, str(workdirs[name]), devices=jax.devices()[:1], log=lambda *_: None)
    return workdirs


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: the suite compiles thousands of small
    programs (kernels in interpret mode, whole training runs), and keeping them all for the
    session grows one process's memory for nothing (a 3.11 CI run aborted inside XLA's compiler
    in the last module)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
