//! The named Byzantine adversaries a seed can draw. At most `f` nodes of the pool are Byzantine, so
//! no replica group of any epoch has more than `f`.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adversary {
    /// Never answers anything.
    Silent,
    /// Serves content blocks with flipped bytes and public-key blocks with altered values.
    Corrupt,
    /// Serves the oldest validly signed version it has seen; says it holds no content block.
    Stale,
    /// Serves forged (mis-signed, higher-version) public-key blocks, pushes forged writes and forged
    /// configurations to other replicas.
    Forge,
    /// Acknowledges writes without storing them, stores nothing from its own transfers either,
    /// claims to hold every range it is asked about for garbage collection, and serves none of them
    /// to the peers of its group.
    AckWithoutStore,
    /// Honest to some clients; stale and acknowledging without storing to others.
    Equivocate,
    /// Answers with garbage bytes and sends garbage to other nodes.
    Garbage,
    /// Honest, but replays recorded messages (of older epochs, as epochs pass) to random peers.
    Replay,
    /// Honest, but its store is full: it holds at most a few content blocks, refuses clients'
    /// new ones (`NoSpace`) and defers what its transfers bring (`Replica::defer`). Drawn apart
    /// from [`Adversary::ALL`] (see `Sim::new`).
    Full,
}

impl Adversary {
    pub const ALL: [Adversary; 8] = [
        Adversary::Silent,
        Adversary::Corrupt,
        Adversary::Stale,
        Adversary::Forge,
        Adversary::AckWithoutStore,
        Adversary::Equivocate,
        Adversary::Garbage,
        Adversary::Replay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Adversary::Silent => "silent",
            Adversary::Corrupt => "corrupt",
            Adversary::Stale => "stale",
            Adversary::Forge => "forge",
            Adversary::AckWithoutStore => "ack-without-store",
            Adversary::Equivocate => "equivocate",
            Adversary::Garbage => "garbage",
            Adversary::Replay => "replay",
            Adversary::Full => "full",
        }
    }
}

impl fmt::Display for Adversary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
