"""What proves the package, for tests, CI and scripts: never imported by ``import gptoss_mlx``.

- ``toolchain``: the Metal compile check (clang) and the CPU emulator of the kernels (needs
  numpy, from the ``test`` extra, and a C++ compiler);
- ``samples``: the inputs every kernel is checked on;
- ``checkpoints``: random checkpoints in the published layouts
  (``python -m gptoss_mlx.testing.checkpoints OUT_DIR``).
"""
