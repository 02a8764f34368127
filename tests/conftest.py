import os

# Fake CPU devices must be configured before jax initialises its backend.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="module")
def base(tmp_path_factory, request):
    """(root, overrides) of configs/cpu/tiny.yaml with its data prepared, one per test module, for the tests that
    train tiny runs and call the commands as a user does."""
    from corpus import prepared_tiny
    return prepared_tiny(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
