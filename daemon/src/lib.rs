//! The dbqsfs node process. Only the command-line skeleton exists so far: see ARCHITECTURE.md.
