//! QUIC transport for dbqsfs. Not written yet: see ARCHITECTURE.md.
