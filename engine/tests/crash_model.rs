//! Seeded random operations against an in-memory model, on the simulation backend, with power
//! cuts that drop or tear every write not covered by a flush. After each recovery, every
//! 512-byte sector must read as its value at the last flush or as a value written after it;
//! every commit must read back exactly.
//!
//! GROVE_CRASH_SEEDS=N runs N seeds (default 40); GROVE_CRASH_SEED=S runs just seed S.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use grove_engine::io::sim::SimDisk;
use grove_engine::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: usize = 512 << 10;
const SECTOR: usize = 512;

fn client() -> SessionClient {
    SessionClient {
        protocol: "test".into(),
        address: "sim".into(),
    }
}

/// Per branch: the current image, and for each sector the values it may hold after a crash.
struct BranchModel {
    image: Vec<u8>,
    durable: Vec<u8>,
    /// Sectors written since the last flush, with every value they took.
    since_flush: HashMap<usize, Vec<Vec<u8>>>,
}

impl BranchModel {
    fn write(&mut self, offset: usize, data: &[u8]) {
        self.image[offset..offset + data.len()].copy_from_slice(data);
        for s in offset / SECTOR..(offset + data.len()).div_ceil(SECTOR) {
            let value = self.image[s * SECTOR..(s + 1) * SECTOR].to_vec();
            self.since_flush.entry(s).or_default().push(value);
        }
    }

    fn flushed(&mut self) {
        self.durable = self.image.clone();
        self.since_flush.clear();
    }
}

async fn run_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = SimDisk::new();
    let mut pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
    pool.create_volume("v", SIZE as u64).await.unwrap();
    let mut branches: HashMap<String, BranchModel> = HashMap::new();
    branches.insert(
        "main".into(),
        BranchModel {
            image: vec![0; SIZE],
            durable: vec![0; SIZE],
            since_flush: HashMap::new(),
        },
    );
    let mut commits: Vec<(CommitId, Vec<u8>)> = Vec::new();
    for step in 0..120 {
        let names: Vec<String> = branches.keys().cloned().collect();
        let branch = names[rng.gen_range(0..names.len())].clone();
        let export = format!("v@{branch}");
        match rng.gen_range(0..100) {
            0..=49 => {
                let aligned = rng.gen_bool(0.6);
                let (offset, len) = if aligned {
                    let blocks = rng.gen_range(1..16usize);
                    (rng.gen_range(0..SIZE / 4096 - blocks) * 4096, blocks * 4096)
                } else {
                    let len = rng.gen_range(1..20000usize);
                    (rng.gen_range(0..SIZE - len), len)
                };
                let byte: u8 = rng.gen();
                let data: Vec<u8> = (0..len)
                    .map(|i| byte.wrapping_add((i / 700) as u8))
                    .collect();
                let s = pool.open_session(&export, client()).unwrap();
                s.write(offset as u64, &data, false).await.unwrap();
                branches.get_mut(&branch).unwrap().write(offset, &data);
            }
            50..=59 => {
                let blocks = rng.gen_range(1..32usize);
                let offset = rng.gen_range(0..SIZE / 4096 - blocks) * 4096;
                let s = pool.open_session(&export, client()).unwrap();
                if rng.gen_bool(0.5) {
                    s.trim(offset as u64, (blocks * 4096) as u64, false)
                        .await
                        .unwrap();
                } else {
                    s.write_zeroes(
                        offset as u64,
                        (blocks * 4096) as u64,
                        ZeroMode::MayTrim,
                        false,
                    )
                    .await
                    .unwrap();
                }
                branches
                    .get_mut(&branch)
                    .unwrap()
                    .write(offset, &vec![0; blocks * 4096]);
            }
            60..=74 => {
                pool.flush().await.unwrap();
                branches.values_mut().for_each(BranchModel::flushed);
            }
            75..=84 => {
                let c = pool
                    .commit(
                        "v",
                        &branch,
                        CommitRequest {
                            message: format!("step {step}"),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                commits.push((c.id, branches[&branch].image.clone()));
                // A commit is a sync point: everything acknowledged is durable.
                branches.values_mut().for_each(BranchModel::flushed);
            }
            85..=89 if branches.len() < 4 => {
                let name = format!("b{step}");
                let from = if !commits.is_empty() && rng.gen_bool(0.5) {
                    let (id, image) = &commits[rng.gen_range(0..commits.len())];
                    pool.create_branch("v", &name, Some(&format!("v@{id}")))
                        .await
                        .unwrap();
                    image.clone()
                } else {
                    pool.create_branch("v", &name, Some(&export)).await.unwrap();
                    branches[&branch].image.clone()
                };
                branches.values_mut().for_each(BranchModel::flushed);
                branches.insert(
                    name,
                    BranchModel {
                        image: from.clone(),
                        durable: from,
                        since_flush: HashMap::new(),
                    },
                );
            }
            _ => {
                // Power cut and recovery.
                drop(pool);
                disk.crash(seed.wrapping_mul(1000).wrapping_add(step));
                pool = Pool::open_with_backend(disk.backend(), 1 << 20, None)
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: recovery failed: {e}"));
                for (name, model) in branches.iter_mut() {
                    let s = pool.open_session(&format!("v@{name}"), client()).unwrap();
                    let got = s.read(0, SIZE as u64).await.unwrap();
                    for sector in 0..SIZE / SECTOR {
                        let range = sector * SECTOR..(sector + 1) * SECTOR;
                        let ok = got[range.clone()] == model.durable[range.clone()]
                            || model.since_flush.get(&sector).is_some_and(|vals| {
                                vals.iter().any(|v| v[..] == got[range.clone()])
                            });
                        assert!(ok, "seed {seed} step {step}: branch {name} sector {sector} holds data never written there");
                    }
                    model.image = got.clone();
                    model.durable = got;
                    model.since_flush.clear();
                }
            }
        }
        for (id, image) in commits.iter().rev().take(2) {
            let s = pool.open_session(&format!("v@{id}"), client()).unwrap();
            assert!(
                s.read(0, SIZE as u64).await.unwrap() == *image,
                "seed {seed} step {step}: commit {id} changed"
            );
        }
    }
    for (name, model) in &branches {
        let s = pool.open_session(&format!("v@{name}"), client()).unwrap();
        assert!(
            s.read(0, SIZE as u64).await.unwrap() == model.image,
            "seed {seed}: branch {name} differs from the model"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_model() {
    if let Ok(seed) = std::env::var("GROVE_CRASH_SEED") {
        run_seed(seed.parse().unwrap()).await;
        return;
    }
    let seeds: u64 = std::env::var("GROVE_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for seed in 0..seeds {
        run_seed(seed).await;
    }
}
