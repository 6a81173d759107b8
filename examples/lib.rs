//! Runnable example programs of dbqsfs live beside this file; run one with `cargo run --release -p dbqsfs-examples --example NAME`.
