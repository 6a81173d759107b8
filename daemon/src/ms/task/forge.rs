//! Test builds only (`fault-injection`): a committee member that forges configurations and
//! freshness certificates and sends garbage agreement messages.

use super::*;

impl Task {
    /// Pushes a configuration certified by this node alone (its signature and made-up ones of the
    /// others) and a forged freshness certificate to every member; sends garbage agreement messages.
    pub(super) fn forge(&mut self) {
        use dbqsfs_core::config::{CertifiedConfig, Configuration, Freshness};
        let chain = self.shared.epochs.chain();
        let cur = chain.config();
        let me = self.shared.me.key.node_id();
        // Keep only ourselves and the fewest others a configuration may have.
        let mut members: Vec<Member> = cur.members.iter().filter(|m| m.id == me).cloned().collect();
        members.extend(
            cur.members
                .iter()
                .filter(|m| m.id != me)
                .take(cur.quorum().group_size() - 1)
                .cloned(),
        );
        let mut next =
            Configuration::new(cur.epoch + 1, cur.params.clone(), members, Some(cur.hash()));
        // Shaped as the MS would make it: the key carried on, so only the certificate is wrong.
        next.key = cur.key.as_ref().map(|k| dbqsfs_core::config::PublicShares {
            epoch: cur.epoch,
            members: cur.committee.clone(),
            commitments: k.commitments.clone(),
        });
        let hash = next.hash();
        let mut signatures: Vec<(NodeId, Signature)> = cur
            .committee
            .iter()
            .map(|id| (*id, Signature([7u8; 64])))
            .collect();
        signatures.retain(|(id, _)| *id != me);
        signatures.push((me, self.shared.me.key.sign(Domain::Configuration, &hash)));
        let forged = CertifiedConfig {
            config: next,
            cert: dbqsfs_core::config::Certificate {
                signatures,
                // One node's own signature where the MS key's should be.
                threshold: Some(self.shared.me.key.sign(Domain::Configuration, &hash)),
            },
        };
        let fresh = Freshness {
            epoch: cur.epoch,
            config: cur.hash(),
            time_ms: unix_ms() + 3_600_000,
            signatures: vec![(me, Signature([9u8; 64]))],
            // One node's own signature where the MS key's should be.
            threshold: Some(self.shared.me.key.sign(
                Domain::Freshness,
                &Freshness::body(cur.epoch, &cur.hash(), unix_ms() + 3_600_000),
            )),
        };
        warn!(
            epoch = cur.epoch + 1,
            "FAULT: pushing a forged configuration to every member"
        );
        let others: Vec<Member> = cur.members.iter().filter(|m| m.id != me).cloned().collect();
        self.send_all(
            others.clone(),
            MsMessage::Push {
                configs: vec![forged],
                freshness: Some(fresh),
            },
        );
        let mut junk = vec![0u8; 200];
        junk.copy_from_slice(&[0x5a; 200]);
        junk[0] = dbqsfs_core::wire::WIRE_VERSION;
        junk[1] = <dbqsfs_core::ms::pbft::AgreementMessage as dbqsfs_core::wire::Protocol>::ID;
        for m in others {
            self.send_raw(m, junk.clone());
        }
    }
}
