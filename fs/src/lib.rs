//! The FUSE mapping of dbqsfs. Not written yet: see ARCHITECTURE.md.
