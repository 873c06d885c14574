"""Evaluating face models: loading one to embed images, verification and IJB metrics, the
sharded embedding all ranks share, and the in-training verification callback.

Below ``trainer/`` (which uses the callback) and above ``models/`` and ``data/`` (layers in
docs/design.md). Modules: ``embedders`` (one loader for ONNX / ``backbone.pt`` / step dir / run
dir / arcface_torch ``.pth``, and the embedding loops), ``sharded`` (slice, pad, all-gather),
``verification`` (LFW-style pair metrics), ``ijb_metrics`` (IJB-B/C 1:1 and 1:N), ``callback``
(``VerificationCallback``). Import the module you need; this package imports none of them.
"""
