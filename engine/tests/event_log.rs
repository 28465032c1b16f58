//! The event log: events numbered in order with their actors, filtered and paged; and across
//! power cuts, an event exists exactly when its change does, every event published before the
//! cut is still there, and numbering continues without reuse.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use grove_engine::io::sim::SimDisk;
use grove_engine::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCKS: u64 = 64;

fn client() -> SessionClient {
    SessionClient {
        protocol: "test".into(),
        address: "sim".into(),
    }
}

fn msg(m: &str) -> CommitRequest {
    CommitRequest {
        message: m.into(),
        ..Default::default()
    }
}

fn all_events(pool: &Pool) -> Vec<LoggedEvent> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let page = pool
            .events(&EventQuery {
                since,
                limit: 7,
                ..Default::default()
            })
            .unwrap();
        out.extend(page.events);
        if page.next_since == since {
            return out;
        }
        since = page.next_since;
    }
}

#[tokio::test]
async fn events_are_numbered_with_actors_and_filtered() {
    let disk = SimDisk::new();
    let pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
    let alice = pool.with_actor("alice");
    alice.create_volume("v", BLOCKS * BLOCK_SIZE).await.unwrap();
    let session = pool.open_session("v", client()).unwrap();
    session
        .write(4 * BLOCK_SIZE, &vec![7; 3 * BLOCK_SIZE as usize], false)
        .await
        .unwrap();
    drop(session);
    let commit = alice.commit("v", "main", msg("first")).await.unwrap();
    pool.create_tag("v", "t1", "main").await.unwrap();
    alice.create_volume("w", BLOCK_SIZE).await.unwrap();

    let events = all_events(&pool);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    let types: Vec<&str> = events.iter().map(|e| e.event.type_name()).collect();
    assert_eq!(
        types,
        [
            "volume.created",
            "session.opened",
            "session.closed",
            "commit.created",
            "tag.created",
            "volume.created"
        ]
    );
    let actors: Vec<Option<&str>> = events.iter().map(|e| e.actor.as_deref()).collect();
    assert_eq!(
        actors,
        [
            Some("alice"),
            Some("test:sim"),
            Some("test:sim"),
            Some("alice"),
            None,
            Some("alice")
        ]
    );
    match &events[3].event {
        Event::CommitCreated {
            commit: id,
            changed_blocks,
            changed_extents,
            changed_extents_complete,
            ..
        } => {
            assert_eq!(*id, commit.id);
            assert_eq!(*changed_blocks, 3);
            assert_eq!(
                changed_extents,
                &[ByteRange {
                    offset_bytes: 4 * BLOCK_SIZE,
                    len_bytes: 3 * BLOCK_SIZE
                }]
            );
            assert!(changed_extents_complete);
        }
        other => panic!("expected the commit, got {other:?}"),
    }

    // Filters: the page resumes past what it looked at, even where nothing matched.
    let page = pool
        .events(&EventQuery {
            since: 0,
            types: vec!["volume.created".into()],
            volume: Some("w".into()),
            limit: 10,
        })
        .unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].seq, 6);
    assert_eq!((page.next_since, page.first_seq, page.last_seq), (6, 1, 6));
    let page = pool
        .events(&EventQuery {
            since: 6,
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert!(page.events.is_empty());
    assert_eq!(page.next_since, 6);
    assert_eq!(pool.last_event_seq(), 6);
}

/// What the log says exists: volumes, and commits with the volume they belong to.
fn replay(events: &[LoggedEvent]) -> (BTreeSet<String>, BTreeSet<(String, CommitId)>) {
    let mut volumes = BTreeSet::new();
    let mut commits = BTreeSet::new();
    for event in events {
        match &event.event {
            Event::VolumeCreated { volume, .. } => {
                volumes.insert(volume.clone());
            }
            Event::VolumeDeleted { volume } => {
                volumes.remove(volume);
                commits.retain(|(v, _)| v != volume);
            }
            Event::CommitCreated { volume, commit, .. } => {
                commits.insert((volume.clone(), *commit));
            }
            Event::CommitDeleted { volume, commit, .. } => {
                commits.remove(&(volume.clone(), *commit));
            }
            _ => {}
        }
    }
    (volumes, commits)
}

async fn check_log_matches_pool(pool: &Pool, context: &str) -> Vec<LoggedEvent> {
    let events = all_events(pool);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "{context}: sequence numbers"
    );
    let (volumes, commits) = replay(&events);
    let live: BTreeSet<String> = pool.volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(
        volumes, live,
        "{context}: volumes in the log and in the pool"
    );
    for (volume, commit) in &commits {
        pool.commit_info(volume, &commit.to_hex())
            .unwrap_or_else(|e| panic!("{context}: logged commit {commit} is gone: {e}"));
    }
    for volume in &live {
        let listed = pool.volume(volume).unwrap().commits;
        let logged = commits.iter().filter(|(v, _)| v == volume).count();
        assert_eq!(listed, logged, "{context}: commits of {volume}");
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_exist_exactly_when_their_changes_do_across_power_cuts() {
    for seed in 0..16u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let disk = SimDisk::new();
        let mut pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
        let mut published = pool.subscribe();
        let mut seen: Vec<LoggedEvent> = Vec::new();
        for step in 0..60u64 {
            let volumes: Vec<String> = pool.volumes().into_iter().map(|v| v.name).collect();
            let name = |rng: &mut StdRng| volumes[rng.gen_range(0..volumes.len())].clone();
            match rng.gen_range(0..10) {
                _ if volumes.is_empty() => {
                    pool.create_volume(&format!("v{step}"), BLOCKS * BLOCK_SIZE)
                        .await
                        .unwrap();
                }
                0 => {
                    pool.create_volume(&format!("v{step}"), BLOCKS * BLOCK_SIZE)
                        .await
                        .unwrap();
                }
                1..=3 => {
                    let volume = name(&mut rng);
                    let session = pool.open_session(&volume, client()).unwrap();
                    let at = rng.gen_range(0..BLOCKS - 4);
                    session
                        .write(at * BLOCK_SIZE, &vec![step as u8; 4096 * 4], false)
                        .await
                        .unwrap();
                }
                4..=5 => {
                    let volume = name(&mut rng);
                    pool.commit(&volume, "main", msg(&format!("step {step}")))
                        .await
                        .unwrap();
                }
                6 => {
                    let volume = name(&mut rng);
                    let _ = pool.create_tag(&volume, &format!("t{step}"), "main").await;
                }
                7 if volumes.len() > 1 => {
                    pool.delete_volume(&name(&mut rng)).await.unwrap();
                }
                8 => pool.flush().await.unwrap(),
                _ => {
                    // A power cut: what was published survives; the log matches the pool.
                    while let Ok(event) = published.try_recv() {
                        seen.push((*event).clone());
                    }
                    drop(published);
                    drop(pool);
                    disk.crash(seed * 1000 + step);
                    pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
                    published = pool.subscribe();
                    let context = format!("seed {seed} step {step}");
                    let events = check_log_matches_pool(&pool, &context).await;
                    assert!(
                        events.len() >= seen.len(),
                        "{context}: published events lost"
                    );
                    assert_eq!(
                        &events[..seen.len()],
                        &seen[..],
                        "{context}: the log differs from what was published"
                    );
                    seen = events;
                }
            }
        }
        while let Ok(event) = published.try_recv() {
            seen.push((*event).clone());
        }
        pool.flush().await.unwrap();
        let events = check_log_matches_pool(&pool, &format!("seed {seed} at the end")).await;
        assert!(events.starts_with(&seen));
    }
}
