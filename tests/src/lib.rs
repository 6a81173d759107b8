//! The dbqsfs simulator and test harnesses.
