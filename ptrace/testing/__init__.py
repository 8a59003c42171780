"""What ptrace's own tests use, shipped for out-of-tree engines and tools (as ``zarr.testing``).

- :mod:`ptrace.testing.conformance`: ``BackendTests``, the suite every engine passes (subclass
  it, set ``backend``, and ``model_path`` or an ``example_model`` fixture). Needs pytest.
- :mod:`ptrace.testing.bundles`: synthetic bundles written without any engine (exact token
  flips, teacher forcing, chosen positions, noise), for tools that read bundles.
"""
