//! Integration tests across the workspace's crates live in `tests/tests/`.
