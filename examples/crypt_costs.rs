//! What encryption at rest costs on this machine, per 1 MiB chunk and per 4 KiB block: sealing
//! (keyed-hash nonce + AES-256-GCM-SIV) and opening, against the BLAKE3 content hash every
//! chunk pays anyway. `cargo run --release -p dbqsfs-examples --example crypt_costs`.

use dbqsfs_fs::crypt::{Encrypted, VolumeKey};
use dbqsfs_fs::{Backend, MemBackend};
use std::time::Instant;

fn main() {
    let mem = MemBackend::with_max_block(2 << 20);
    let enc = Encrypted::new(mem.clone(), &VolumeKey::from_bytes([9; 32]));
    for size in [4096usize, 1 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let n = (256 << 20) / size;
        let t = Instant::now();
        for i in 0..n {
            let mut d = data.clone();
            d[0] = i as u8;
            mem.put_chunk(&d).unwrap();
        }
        let plain = t.elapsed();
        let t = Instant::now();
        let mut ids = Vec::new();
        for i in 0..n {
            let mut d = data.clone();
            d[0] = i as u8;
            ids.push(enc.put_chunk(&d).unwrap());
        }
        let sealed = t.elapsed();
        let t = Instant::now();
        for id in &ids {
            enc.get_chunk(id).unwrap();
        }
        let opened = t.elapsed();
        let mb = (n * size) as f64 / 1e6;
        println!(
            "{size:>8} B chunks: put plain {:7.0} MB/s, put encrypted {:7.0} MB/s, get encrypted {:7.0} MB/s",
            mb / plain.as_secs_f64(),
            mb / sealed.as_secs_f64(),
            mb / opened.as_secs_f64()
        );
    }
}
