//! Seeded random history operations (writes, trims, commits, branches, merges with every
//! strategy (manual ones concluded or aborted later), resets, commit squashes, clones, space scans) against an in-memory model on the
//! simulation backend. After every step the touched refs read back as the model says; diffs
//! between random refs list exactly the blocks whose content differs; merges take, keep and
//! report conflicts exactly as a block-level three-way merge over the engine's merge base
//! would. Space scans must leave the allocator with exactly what a fresh open finds in use,
//! and the pool must reopen to the same content. Power cuts at random steps must keep every
//! sync point exactly.
//!
//! GROVE_HISTORY_SEEDS=N runs N seeds (default 24) from GROVE_HISTORY_FIRST_SEED (default 0);
//! GROVE_HISTORY_SEED=S runs just seed S.
//! GROVE_HISTORY_TRACE=1 prints each step; GROVE_HISTORY_CHECK_EACH_STEP=1 syncs and checks
//! consistency after every one.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use grove_engine::io::sim::SimDisk;
use grove_engine::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCKS: usize = 48;
const SIZE: u64 = (BLOCKS as u64) * BLOCK_SIZE;

fn client() -> SessionClient {
    SessionClient {
        protocol: "test".into(),
        address: "sim".into(),
    }
}

/// A block's content is a token (0: zeros); each write uses a fresh one, so equal tokens mean
/// equal content and shared origin.
type Image = Vec<u64>;

fn block_bytes(token: u64) -> Vec<u8> {
    if token == 0 {
        return vec![0; BLOCK_SIZE as usize];
    }
    token.to_le_bytes().repeat(BLOCK_SIZE as usize / 8)
}

fn decode(bytes: &[u8]) -> Image {
    bytes
        .chunks(BLOCK_SIZE as usize)
        .map(|b| {
            let token = u64::from_le_bytes(b[..8].try_into().unwrap());
            assert_eq!(
                b,
                &block_bytes(token)[..],
                "a block holds a torn or foreign pattern"
            );
            token
        })
        .collect()
}

#[derive(Default)]
struct Model {
    /// (volume, branch) -> (image, latest commit, written since it)
    heads: BTreeMap<(String, String), (Image, Option<CommitId>, bool)>,
    commits: BTreeMap<CommitId, (String, Image)>,
    /// Every commit ever made, oldest first. Commit ids are random, so choices are made in
    /// this order, which keeps a seed's run the same from one process to the next.
    created: Vec<CommitId>,
    /// Manual merges in progress: (volume, merge branch) -> (into, ours, theirs).
    merges: BTreeMap<(String, String), (String, Option<CommitId>, CommitId)>,
    next_token: u64,
}

impl Model {
    fn add_commit(&mut self, id: CommitId, volume: &str, image: Image) {
        self.commits.insert(id, (volume.to_string(), image));
        self.created.push(id);
    }

    /// The live commits, of `volume` or of all volumes, oldest first.
    fn commit_ids(&self, volume: Option<&str>) -> Vec<CommitId> {
        self.created
            .iter()
            .filter(|id| {
                self.commits
                    .get(id)
                    .is_some_and(|(v, _)| volume.is_none_or(|volume| v == volume))
            })
            .copied()
            .collect()
    }
}

async fn read_ref(pool: &Pool, export: &str) -> Image {
    let session = pool.open_session(export, client()).unwrap();
    decode(&session.read(0, SIZE).await.unwrap())
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

fn export_of(volume: &str, branch: &str) -> String {
    format!("{volume}@{branch}")
}

async fn check_diff(pool: &Pool, model: &Model, rng: &mut StdRng) {
    let mut refs: Vec<(String, Image)> = model
        .heads
        .iter()
        .map(|((v, b), (img, _, _))| (export_of(v, b), img.clone()))
        .collect();
    refs.extend(model.commit_ids(None).into_iter().map(|id| {
        let (v, img) = &model.commits[&id];
        (format!("{v}@{id}"), img.clone())
    }));
    for _ in 0..3 {
        let (a, ia) = pick(rng, &refs).clone();
        let (b, ib) = pick(rng, &refs).clone();
        let (va, vb) = (a.split('@').next().unwrap(), b.split('@').next().unwrap());
        let diff = pool.diff(va, &a, &b).await;
        let related = va == vb || va.starts_with("clone") || vb.starts_with("clone");
        let diff = match diff {
            Ok(diff) => diff,
            Err(err) => panic!("diff {a} {b} (related: {related}): {err}"),
        };
        let expected: Vec<u64> = (0..BLOCKS as u64)
            .filter(|&i| ia[i as usize] != ib[i as usize])
            .collect();
        let got: Vec<u64> = diff.blocks.iter().collect();
        assert_eq!(got, expected, "diff {a} -> {b}");
        assert!(diff.candidate_blocks >= got.len() as u64);
    }
}

/// Commits a head and records the commit in the model.
async fn commit(pool: &Pool, model: &mut Model, volume: &str, branch: &str, message: String) {
    let request = CommitRequest {
        message,
        ..Default::default()
    };
    let info = pool.commit(volume, branch, request).await.unwrap();
    let head = model
        .heads
        .get_mut(&(volume.to_string(), branch.to_string()))
        .unwrap();
    head.1 = Some(info.id);
    head.2 = false;
    let image = head.0.clone();
    model.add_commit(info.id, volume, image);
}

/// Names the seed of a failing run, whatever assertion failed.
struct SeedReport(u64);

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "history model failed on seed {} (GROVE_HISTORY_SEED={0})",
                self.0
            );
        }
    }
}

async fn run_seed(seed: u64) {
    let _report = SeedReport(seed);
    let trace = std::env::var("GROVE_HISTORY_TRACE").is_ok();
    let check_each_step = std::env::var("GROVE_HISTORY_CHECK_EACH_STEP").is_ok();
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = SimDisk::new();
    // Odd seeds page metadata through the smallest cache.
    let cache = if seed % 2 == 1 { 0 } else { 1 << 20 };
    let mut pool = Pool::open_with_backend(disk.backend(), cache, None).unwrap();
    let mut model = Model {
        next_token: 1,
        ..Default::default()
    };
    pool.create_volume("v", SIZE).await.unwrap();
    model
        .heads
        .insert(("v".into(), "main".into()), (vec![0; BLOCKS], None, false));
    for step in 0..150 {
        let heads: Vec<(String, String)> = model.heads.keys().cloned().collect();
        let (volume, branch) = pick(&mut rng, &heads).clone();
        let mut what = rng.gen_range(0..100);
        // Merges in progress are often settled soon, before their target moves on.
        let merges: Vec<(String, String)> = model.merges.keys().cloned().collect();
        let (volume, branch) = if !merges.is_empty() && rng.gen_bool(0.2) {
            what = *pick(&mut rng, &[0, 40]);
            pick(&mut rng, &merges).clone()
        } else {
            (volume, branch)
        };
        let export = export_of(&volume, &branch);
        if trace {
            eprintln!("step {step}: op {what} on {export}");
        }
        match what {
            0..=34 => {
                let len = rng.gen_range(1..8usize);
                let first = rng.gen_range(0..BLOCKS - len);
                let mut data = Vec::new();
                let head = model
                    .heads
                    .get_mut(&(volume.clone(), branch.clone()))
                    .unwrap();
                for i in first..first + len {
                    let token = model.next_token;
                    model.next_token += 1;
                    head.0[i] = token;
                    data.extend(block_bytes(token));
                }
                head.2 = true;
                let session = pool.open_session(&export, client()).unwrap();
                session
                    .write(first as u64 * BLOCK_SIZE, &data, false)
                    .await
                    .unwrap();
            }
            35..=39 => {
                let len = rng.gen_range(1..6usize);
                let first = rng.gen_range(0..BLOCKS - len);
                let head = model
                    .heads
                    .get_mut(&(volume.clone(), branch.clone()))
                    .unwrap();
                for i in first..first + len {
                    head.0[i] = 0;
                }
                // Without history a trimmed block is simply unwritten again.
                head.2 = head.1.is_some() || head.0.iter().any(|&t| t != 0);
                let session = pool.open_session(&export, client()).unwrap();
                session
                    .trim(first as u64 * BLOCK_SIZE, len as u64 * BLOCK_SIZE, false)
                    .await
                    .unwrap();
            }
            40..=54 if model.merges.contains_key(&(volume.clone(), branch.clone())) => {
                let key = (volume.clone(), branch.clone());
                assert!(matches!(
                    pool.commit(
                        &volume,
                        &branch,
                        CommitRequest {
                            message: "no".into(),
                            ..Default::default()
                        }
                    )
                    .await,
                    Err(Error::Conflict(_))
                ));
                let (into, ours, theirs) = model.merges[&key].clone();
                if rng.gen_bool(0.3) {
                    pool.abort_merge(&volume, &branch).await.unwrap();
                    model.merges.remove(&key);
                    model.heads.remove(&key);
                    continue;
                }
                let result = pool.conclude_merge(&volume, &branch, None, None).await;
                if trace {
                    eprintln!("conclude {:?}", result.as_ref().map(|c| c.changed_blocks));
                }
                match model.heads.get(&(volume.clone(), into.clone())) {
                    Some((_, latest, dirty)) if *latest == ours && !dirty => {
                        let commit = result.unwrap();
                        assert_eq!(
                            commit.parents,
                            ours.into_iter().chain([theirs]).collect::<Vec<_>>()
                        );
                        let (img, _, _) = model.heads.remove(&key).unwrap();
                        model.merges.remove(&key);
                        model.add_commit(commit.id, &volume, img.clone());
                        model.heads.insert(
                            (volume.clone(), into.clone()),
                            (img, Some(commit.id), false),
                        );
                        let export = export_of(&volume, &into);
                        assert_eq!(
                            &read_ref(&pool, &export).await,
                            &model.heads[&(volume.clone(), into.clone())].0,
                            "seed {seed} step {step}: {export} after concluding"
                        );
                        continue;
                    }
                    Some(_) => assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}"),
                    None => assert!(result.is_err()),
                }
            }
            40..=54 => {
                commit(&pool, &mut model, &volume, &branch, format!("step {step}")).await;
            }
            55..=61 | 77..=81 | 88..=90
                if model.merges.contains_key(&(volume.clone(), branch.clone())) =>
            {
                // Branching from, resetting or cloning a merge branch is refused.
                let result = match what {
                    55..=61 => pool
                        .create_branch(&volume, &format!("b{step}"), Some(&branch))
                        .await
                        .map(|_| ()),
                    77..=81 => pool
                        .reset_branch(&volume, &branch, &branch, true)
                        .await
                        .map(|_| ()),
                    _ => pool
                        .clone_volume(&export, &format!("clone{step}"))
                        .await
                        .map(|_| ()),
                };
                assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}");
            }
            55..=61 if model.heads.len() < 6 => {
                let name = format!("b{step}");
                // From the head itself (uncommitted writes included) or from a commit.
                let commits = model.commit_ids(Some(&volume));
                let state = if commits.is_empty() || rng.gen_bool(0.5) {
                    pool.create_branch(&volume, &name, Some(&branch))
                        .await
                        .unwrap();
                    model.heads[&(volume.clone(), branch.clone())].clone()
                } else {
                    let id = *pick(&mut rng, &commits);
                    pool.create_branch(&volume, &name, Some(&id.to_hex()))
                        .await
                        .unwrap();
                    (model.commits[&id].1.clone(), Some(id), false)
                };
                model.heads.insert((volume.clone(), name), state);
            }
            62..=76 => {
                // Merge another branch's latest commit of the same volume into this one.
                let others: Vec<String> = heads
                    .iter()
                    .filter(|(v, b)| *v == volume && *b != branch)
                    .map(|(_, b)| b.clone())
                    .collect();
                if others.is_empty() {
                    continue;
                }
                let from = pick(&mut rng, &others).clone();
                let strategy = *pick(
                    &mut rng,
                    &[
                        MergeStrategy::Fail,
                        MergeStrategy::Ours,
                        MergeStrategy::Theirs,
                        MergeStrategy::Manual,
                    ],
                );
                let dry_run = rng.gen_bool(0.2);
                let merge_branch = format!("m{step}");
                let request = MergeRequest {
                    from: from.clone(),
                    into: branch.clone(),
                    strategy,
                    dry_run,
                    merge_branch: Some(merge_branch.clone()),
                    ..Default::default()
                };
                if model.merges.contains_key(&(volume.clone(), branch.clone())) {
                    // Refused; a source without commits may be the reason given.
                    let result = pool.merge(&volume, request).await;
                    let theirs = model.heads[&(volume.clone(), from.clone())].1;
                    match result {
                        Err(Error::Conflict(_)) => {}
                        Err(Error::InvalidArgument(_)) if theirs.is_none() => {}
                        other => panic!("merging into a merge in progress: {other:?}"),
                    }
                    continue;
                }
                if rng.gen_bool(0.6) && model.heads[&(volume.clone(), branch.clone())].2 {
                    // Usually commit first, so that merges happen.
                    commit(
                        &pool,
                        &mut model,
                        &volume,
                        &branch,
                        format!("before merge {step}"),
                    )
                    .await;
                }
                let (ours_img, ours, dirty) =
                    model.heads[&(volume.clone(), branch.clone())].clone();
                let theirs = model.heads[&(volume.clone(), from.clone())].1;
                let result = pool.merge(&volume, request).await;
                let Some(theirs) = theirs else {
                    assert!(result.is_err(), "merging a branch without commits");
                    continue;
                };
                if dirty {
                    assert!(
                        matches!(result, Err(Error::Conflict(_))),
                        "merging into a branch with uncommitted writes: {result:?}"
                    );
                    continue;
                }
                let report = result.unwrap();
                let full = |id: CommitId| format!("{}@{id}", model.commits[&id].0);
                let base = pool
                    .merge_base(
                        &volume,
                        &ours.map(full).unwrap_or(branch.clone()),
                        &full(theirs),
                    )
                    .unwrap();
                let base = if ours.is_none() { None } else { base };
                assert_eq!(report.base, base);
                let base_img = base
                    .map(|b| model.commits[&b].1.clone())
                    .unwrap_or_else(|| vec![0; BLOCKS]);
                let theirs_img = model.commits[&theirs].1.clone();
                let mut merged = ours_img.clone();
                let mut conflicts = Vec::new();
                let mut taken = Vec::new();
                for i in 0..BLOCKS {
                    let (o, t, b) = (ours_img[i], theirs_img[i], base_img[i]);
                    if t != b && o == b {
                        merged[i] = t;
                        taken.push(i as u64);
                    } else if t != b && o != b && o != t {
                        conflicts.push(i as u64);
                        if strategy == MergeStrategy::Theirs {
                            merged[i] = t;
                            taken.push(i as u64);
                        }
                    }
                }
                let expected_outcome = if base == Some(theirs) {
                    MergeOutcome::UpToDate
                } else if base == ours {
                    MergeOutcome::FastForward
                } else if !conflicts.is_empty() && strategy == MergeStrategy::Fail {
                    MergeOutcome::Conflicts
                } else if !conflicts.is_empty() && strategy == MergeStrategy::Manual {
                    MergeOutcome::InProgress
                } else {
                    MergeOutcome::Merged
                };
                assert_eq!(report.outcome, expected_outcome, "seed {seed} step {step}");
                if trace {
                    eprintln!(
                        "merge {expected_outcome:?} dry={dry_run} conflicts={} taken={}",
                        conflicts.len(),
                        taken.len()
                    );
                }
                if matches!(
                    expected_outcome,
                    MergeOutcome::Merged | MergeOutcome::Conflicts | MergeOutcome::InProgress
                ) {
                    let blocks = |ranges: &[ByteRange]| -> Vec<u64> {
                        ranges
                            .iter()
                            .flat_map(|r| {
                                r.offset_bytes / BLOCK_SIZE
                                    ..(r.offset_bytes + r.len_bytes) / BLOCK_SIZE
                            })
                            .collect()
                    };
                    assert_eq!(blocks(&report.conflicts), conflicts, "conflicts");
                    assert_eq!(blocks(&report.taken), taken, "taken");
                }
                if dry_run {
                    assert!(report.commit.is_none());
                    continue;
                }
                let head = model
                    .heads
                    .get_mut(&(volume.clone(), branch.clone()))
                    .unwrap();
                match expected_outcome {
                    MergeOutcome::UpToDate | MergeOutcome::Conflicts => {}
                    MergeOutcome::InProgress => {
                        assert_eq!(report.merge_branch.as_deref(), Some(merge_branch.as_str()));
                        let state = pool.merge_in_progress(&volume, &merge_branch).unwrap();
                        assert_eq!(state.into, branch);
                        assert_eq!(state.conflict_bytes, conflicts.len() as u64 * BLOCK_SIZE);
                        assert_eq!(state.edited_bytes, 0);
                        // Conflicting blocks hold ours until someone writes them.
                        let key = (volume.clone(), merge_branch.clone());
                        model
                            .heads
                            .insert(key.clone(), (merged.clone(), ours, !taken.is_empty()));
                        model.merges.insert(key, (branch.clone(), ours, theirs));
                        let export = export_of(&volume, &merge_branch);
                        assert_eq!(
                            &read_ref(&pool, &export).await,
                            &merged,
                            "seed {seed} step {step}: {export}"
                        );
                    }
                    MergeOutcome::FastForward => {
                        *head = (theirs_img, Some(theirs), false);
                    }
                    MergeOutcome::Merged => {
                        let commit = report.commit.unwrap();
                        assert_eq!(commit.parents, vec![ours.unwrap(), theirs]);
                        *head = (merged.clone(), Some(commit.id), false);
                        model.add_commit(commit.id, &volume, merged);
                    }
                }
            }
            77..=81 => {
                let commits = model.commit_ids(Some(&volume));
                if commits.is_empty() {
                    continue;
                }
                let target = *pick(&mut rng, &commits);
                let discard = rng.gen_bool(0.7);
                let result = pool
                    .reset_branch(&volume, &branch, &target.to_hex(), discard)
                    .await;
                let head = model
                    .heads
                    .get_mut(&(volume.clone(), branch.clone()))
                    .unwrap();
                if head.2 && !discard {
                    assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}");
                } else {
                    result.unwrap();
                    *head = (model.commits[&target].1.clone(), Some(target), false);
                }
            }
            82..=87 => {
                let commits = model.commit_ids(None);
                if commits.is_empty() {
                    continue;
                }
                let id = *pick(&mut rng, &commits);
                let needed = model.heads.values().any(|h| h.1 == Some(id))
                    || model.merges.values().any(|m| m.2 == id);
                let owner = model.commits[&id].0.clone();
                if trace {
                    let info = pool.commit_info(&owner, &id.to_hex()).unwrap();
                    eprintln!("delete {owner}@{id} parents {:?}", info.parents);
                    for cid in model.commit_ids(None) {
                        let (cv, _) = &model.commits[&cid];
                        let c = pool.commit_info(cv, &cid.to_hex()).unwrap();
                        let changes = pool.commit_changes(cv, &cid.to_hex()).unwrap();
                        eprintln!(
                            "  {cv}@{cid} parents {:?} changes {changes:?} image {:?}",
                            c.parents, model.commits[&cid].1
                        );
                    }
                }
                let result = pool.delete_commit(&owner, &id.to_hex()).await;
                if needed {
                    assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}");
                } else {
                    result.unwrap();
                    model.commits.remove(&id);
                }
            }
            88..=90 if !model.heads.keys().any(|(v, _)| v.starts_with("clone")) => {
                let name = format!("clone{step}");
                pool.clone_volume(&export, &name).await.unwrap();
                let state = model.heads[&(volume.clone(), branch.clone())].clone();
                model.heads.insert((name, "main".into()), state);
            }
            91..=92 => {
                pool.reclaim().await.unwrap();
            }
            93 => {
                // A power cut: every commit, merge, reset, squash and clone was a sync point
                // and survives exactly; unflushed head writes may be lost or torn, so heads
                // with any are set back to a known state.
                drop(pool);
                disk.crash(seed * 1000 + step);
                pool = Pool::open_with_backend(disk.backend(), cache, None).unwrap();
                // Merges in progress survive; writes on their branches may be torn, so they
                // are aborted.
                for ((v, b), (into, _, theirs)) in std::mem::take(&mut model.merges) {
                    let state = pool.merge_in_progress(&v, &b).unwrap();
                    assert_eq!((state.into, state.from_commit), (into, theirs));
                    pool.abort_merge(&v, &b).await.unwrap();
                    model.heads.remove(&(v, b));
                }
                for ((v, b), head) in model.heads.iter_mut() {
                    let info = pool.branch(v, b).unwrap();
                    assert_eq!(
                        info.head_commit, head.1,
                        "seed {seed} step {step}: {v}@{b} after a crash"
                    );
                    if !head.2 && info.uncommitted_blocks == 0 {
                        continue;
                    }
                    match head.1 {
                        Some(c) => {
                            pool.reset_branch(v, b, &format!("{}@{c}", model.commits[&c].0), true)
                                .await
                                .unwrap();
                            head.0 = model.commits[&c].1.clone();
                        }
                        None => {
                            let s = pool.open_session(&export_of(v, b), client()).unwrap();
                            s.trim(0, SIZE, false).await.unwrap();
                            head.0 = vec![0; BLOCKS];
                        }
                    }
                    head.2 = false;
                }
                for (id, (v, img)) in &model.commits {
                    assert_eq!(
                        &read_ref(&pool, &format!("{v}@{id}")).await,
                        img,
                        "seed {seed} step {step}: {v}@{id} after a crash"
                    );
                }
            }
            94..=95 => {
                // Delete a branch (not main) or a clone volume.
                let (v, b) = pick(&mut rng, &heads).clone();
                if v.starts_with("clone") && b == "main" {
                    let result = pool.delete_volume(&v).await;
                    result.unwrap();
                    model.heads.retain(|(hv, _), _| *hv != v);
                    model.merges.retain(|(mv, _), _| *mv != v);
                    model.commits.retain(|_, (cv, _)| *cv != v);
                } else if model
                    .merges
                    .iter()
                    .any(|((mv, _), (into, _, _))| *mv == v && *into == b)
                {
                    // A branch with merges into it in progress stays until they are settled.
                    let result = pool.delete_branch(&v, &b).await;
                    assert!(matches!(result, Err(Error::Conflict(_))), "{result:?}");
                } else if b != "main" {
                    pool.delete_branch(&v, &b).await.unwrap();
                    model.merges.remove(&(v.clone(), b.clone()));
                    model.heads.remove(&(v, b));
                }
            }
            _ => {
                check_diff(&pool, &model, &mut rng).await;
            }
        }
        if check_each_step {
            // Finds the step that breaks consistency, not only that one did. The check reads
            // what is durable, so it syncs first (which makes the run differ a little).
            pool.flush().await.unwrap();
            let report = pool.check_consistency().unwrap();
            assert!(
                report.clean(),
                "seed {seed} step {step}: {:?}",
                report.problems
            );
        }
        // The touched head reads as modelled.
        if let Some((img, _, _)) = model.heads.get(&(volume.clone(), branch.clone())) {
            assert_eq!(
                &read_ref(&pool, &export).await,
                img,
                "seed {seed} step {step}: {export}"
            );
        }
    }
    check_diff(&pool, &model, &mut rng).await;

    // The consistency check finds nothing wrong: catalog references, blobs, extents, and
    // every commit's bitmap against its map.
    pool.flush().await.unwrap();
    let report = pool.check_consistency().unwrap();
    assert!(report.clean(), "seed {seed}: {:?}", report.problems);

    // A scan leaves in use exactly what a fresh open finds referenced.
    pool.reclaim().await.unwrap();
    pool.flush().await.unwrap();
    let before = pool.stats().unwrap();
    drop(pool);
    pool = Pool::open_with_backend(disk.backend(), cache, None).unwrap();
    let after = pool.stats().unwrap();
    assert_eq!(
        before.used_bytes, after.used_bytes,
        "seed {seed}: data in use after a scan"
    );
    assert_eq!(
        before.metadata_bytes, after.metadata_bytes,
        "seed {seed}: metadata in use after a scan"
    );
    for ((v, b), (img, _, _)) in &model.heads {
        assert_eq!(
            &read_ref(&pool, &export_of(v, b)).await,
            img,
            "after reopen: {v}@{b}"
        );
    }
    for (id, (v, img)) in &model.commits {
        assert_eq!(
            &read_ref(&pool, &format!("{v}@{id}")).await,
            img,
            "after reopen: {v}@{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_matches_the_model() {
    if let Ok(seed) = std::env::var("GROVE_HISTORY_SEED") {
        run_seed(seed.parse().unwrap()).await;
        return;
    }
    let number = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let seeds = number("GROVE_HISTORY_SEEDS").unwrap_or(24);
    let first = number("GROVE_HISTORY_FIRST_SEED").unwrap_or(0);
    for seed in first..first + seeds {
        run_seed(seed).await;
    }
}
