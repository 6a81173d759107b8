//! Whole configurations in pieces (`ms::pieces`): the head's chaining values make the certified
//! hash for any number of pieces, every piece is checked on its own, a source that sends a wrong
//! piece is refused and the piece comes from another, a silent source's pieces are asked
//! elsewhere, a transfer resumes from what it held, and forged heads are refused.

use dbqsfs_core::config::{CertifiedConfig, Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId};
use dbqsfs_core::ms::pieces::{
    piece, ConfigHead, Download, PieceError, PIECE_LEN, PIECE_TIMEOUT_MS, WINDOW,
};
use std::collections::BTreeMap;

fn keys(n: u32) -> Vec<Keypair> {
    (0..n)
        .map(|i| {
            let mut seed = [7u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            Keypair::from_seed(seed)
        })
        .collect()
}

fn config(epoch: u64, ks: &[Keypair], prev: Option<[u8; 32]>) -> Configuration {
    let members = ks
        .iter()
        .enumerate()
        .map(|(i, k)| Member::new(k.public(), format!("10.{}.{}.1:7000", i / 250, i % 250)))
        .collect();
    Configuration::new(epoch, Params::with_f(1), members, prev)
}

/// Genesis of `n` members and its successor without the last member, certified by `prev`'s
/// committee (or by `signers` when given).
fn history(n: u32) -> (Vec<Keypair>, Configuration, CertifiedConfig) {
    let ks = keys(n);
    let g = config(0, &ks, None);
    let c1 = config(1, &ks[..n as usize - 1], Some(g.hash()));
    let committee: Vec<&Keypair> = ks
        .iter()
        .filter(|k| g.committee.contains(&k.node_id()))
        .collect();
    (ks.clone(), g, CertifiedConfig::certify(c1, &committee[..3]))
}

fn ids(n: u8) -> Vec<NodeId> {
    (0..n)
        .map(|i| Keypair::from_seed([200 + i; 32]).node_id())
        .collect()
}

/// Runs `d` to completion against `sources`; `serve` says what a source answers for a piece
/// (`None`: silence). Returns the sources asked, batch by batch. Bounded.
fn drive(
    d: &mut Download,
    sources: &[NodeId],
    bytes: &[u8],
    serve: impl Fn(NodeId, u32, &[u8]) -> Option<Vec<u8>>,
) -> Vec<Vec<NodeId>> {
    let mut now = 0;
    let mut asked = Vec::new();
    for _ in 0..1_000 {
        if d.is_complete() {
            break;
        }
        let batch = d.asks(now, sources);
        asked.push(batch.iter().map(|a| a.to).collect());
        for a in batch {
            let right = piece(bytes, a.index).unwrap();
            if let Some(answer) = serve(a.to, a.index, right) {
                let _ = d.on_piece(a.to, a.index, answer);
            }
        }
        now += PIECE_TIMEOUT_MS / 2;
    }
    asked
}

#[test]
fn the_head_makes_the_certified_hash_and_every_piece_checks_for_any_number_of_pieces() {
    for n in [5, 900, 1_700, 2_600, 5_500] {
        let (_, g, c1) = history(n);
        let (head, bytes) = ConfigHead::of(&c1);
        let pieces = bytes.len().div_ceil(PIECE_LEN as usize) as u32;
        assert_eq!(head.pieces(), pieces, "{n} members");
        assert_eq!(head.hash, c1.config.hash());
        head.verify(&g)
            .unwrap_or_else(|e| panic!("{n} members: {e}"));
        for i in 0..pieces {
            let p = piece(&bytes, i).unwrap();
            head.check_piece(i, p).unwrap();
            let mut bad = p.to_vec();
            bad[p.len() / 2] ^= 1;
            assert_eq!(head.check_piece(i, &bad), Err(PieceError::BadPiece(i)));
            assert_eq!(head.check_piece(i, &p[1..]), Err(PieceError::BadPiece(i)));
        }
        assert_eq!(
            head.check_piece(pieces, b"x"),
            Err(PieceError::NoSuchPiece(pieces))
        );
        let mut d = Download::new(&g, head).unwrap();
        drive(&mut d, &ids(1), &bytes, |_, _, p| Some(p.to_vec()));
        assert_eq!(d.finish(&g).unwrap(), c1, "{n} members");
    }
}

#[test]
fn a_source_that_sends_a_wrong_piece_is_refused_and_the_piece_comes_from_another() {
    let (_, g, c1) = history(7_000);
    let (head, bytes) = ConfigHead::of(&c1);
    assert!(head.pieces() as usize > WINDOW);
    let sources = ids(3);
    let liar = sources[1];
    let mut d = Download::new(&g, head).unwrap();
    let asked = drive(&mut d, &sources, &bytes, |to, _, p| {
        let mut p = p.to_vec();
        if to == liar {
            p[0] ^= 0xff;
        }
        Some(p)
    });
    // The liar is asked in the first batch, where its first wrong piece is seen, and never after.
    assert!(asked[0].contains(&liar));
    assert!(asked[1..].iter().flatten().all(|s| *s != liar), "{asked:?}");
    assert_eq!(d.refused().iter().copied().collect::<Vec<_>>(), vec![liar]);
    assert_eq!(d.finish(&g).unwrap(), c1);
}

#[test]
fn a_silent_source_costs_one_timeout_and_its_pieces_are_asked_of_another() {
    let (_, g, c1) = history(3_000);
    let (head, bytes) = ConfigHead::of(&c1);
    let sources = ids(2);
    let silent = sources[0];
    let mut d = Download::new(&g, head).unwrap();
    let first = d.asks(0, &sources);
    assert!(first.iter().any(|a| a.to == silent));
    for a in &first {
        if a.to != silent {
            d.on_piece(a.to, a.index, piece(&bytes, a.index).unwrap().to_vec())
                .unwrap();
        }
    }
    // Before the timeout nothing the silent source holds is asked again.
    let before = d.asks(PIECE_TIMEOUT_MS - 1, &sources);
    assert!(before
        .iter()
        .all(|a| !first.iter().any(|f| f.index == a.index)));
    for a in &before {
        d.on_failed(a.to, a.index);
    }
    // After it, the overdue pieces go to the other source.
    let after = d.asks(PIECE_TIMEOUT_MS, &sources);
    for f in first.iter().filter(|f| f.to == silent) {
        let again = after.iter().find(|a| a.index == f.index).unwrap();
        assert_ne!(again.to, silent);
    }
    drive(&mut d, &sources, &bytes, |to, _, p| {
        (to != silent).then(|| p.to_vec())
    });
    assert!(d.refused().is_empty());
    assert_eq!(d.finish(&g).unwrap(), c1);
}

#[test]
fn a_transfer_resumes_from_the_pieces_it_held_and_checks_them_again() {
    let (_, g, c1) = history(3_000);
    let (head, bytes) = ConfigHead::of(&c1);
    let n = head.pieces();
    let mut held: BTreeMap<u32, Vec<u8>> = (0..n)
        .step_by(2)
        .map(|i| (i, piece(&bytes, i).unwrap().to_vec()))
        .collect();
    held.get_mut(&0).unwrap()[3] ^= 1; // damaged while kept: dropped and fetched again
    let mut d = Download::resume(&g, head, held).unwrap();
    assert_eq!(d.progress(), ((n - 1) / 2, n));
    let asked = std::cell::RefCell::new(Vec::new());
    drive(&mut d, &ids(2), &bytes, |_, i, p| {
        asked.borrow_mut().push(i);
        Some(p.to_vec())
    });
    let mut asked = asked.into_inner();
    asked.sort();
    let expected: Vec<u32> = (0..n).filter(|i| i % 2 == 1 || *i == 0).collect();
    assert_eq!(asked, expected);
    assert_eq!(d.finish(&g).unwrap(), c1);
}

#[test]
fn forged_heads_are_refused() {
    let (ks, g, c1) = history(3_000);
    let (head, _) = ConfigHead::of(&c1);

    let mut h = head.clone();
    h.cvs[1][0] ^= 1;
    assert_eq!(h.verify(&g), Err(PieceError::BadManifest));

    let mut h = head.clone();
    h.cvs.pop();
    assert_eq!(h.verify(&g), Err(PieceError::BadManifest));

    let mut h = head.clone();
    h.len += PIECE_LEN;
    assert_eq!(h.verify(&g), Err(PieceError::BadManifest));

    let mut h = head.clone();
    h.len = 0;
    assert_eq!(h.verify(&g), Err(PieceError::BadLength(0)));

    let mut h = head.clone();
    h.epoch = 2;
    assert!(matches!(h.verify(&g), Err(PieceError::WrongEpoch { .. })));

    // Certified by members outside the committee.
    let outsiders: Vec<&Keypair> = ks
        .iter()
        .filter(|k| !g.committee.contains(&k.node_id()))
        .take(3)
        .collect();
    let forged = CertifiedConfig::certify(c1.config.clone(), &outsiders);
    let (h, _) = ConfigHead::of(&forged);
    assert!(matches!(h.verify(&g), Err(PieceError::Config(_))));

    // Another configuration's pieces under this head's certificate: the hash is not certified.
    let other = config(1, &ks[1..], Some(g.hash()));
    let (mut h, _) = ConfigHead::of(&CertifiedConfig {
        config: other,
        cert: c1.cert.clone(),
    });
    assert!(matches!(h.verify(&g), Err(PieceError::Config(_))));
    h.hash = head.hash;
    assert_eq!(h.verify(&g), Err(PieceError::BadManifest));
}
