//! Lineage: which sessions wrote each commit's data, and which commits it was derived from.
//!
//! A head notes every session that writes to it (with its job) until the next commit, which
//! records them. Sessions may join a job by adding `?job=ID` to the export name: what a job's
//! sessions read from commits (or from branch heads, meaning their latest commits) is counted
//! per commit, and a commit of a head a job wrote records those commits as its sources, with
//! the bytes read. Clients may also name sources in the commit request. Job reads are kept in
//! memory: a restart forgets reads not yet recorded by a commit.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::catalog::HeadLineage;
use crate::error::{Error, Result};
use crate::pool::{Pool, State};
use crate::session::SessionInfo;
use crate::types::*;

/// What a job read: per commit, its volume and the bytes read.
pub(crate) type JobReads = BTreeMap<CommitId, (String, u64)>;

/// Jobs whose reads are remembered at most; beyond, those no head holds writes of go first,
/// least recently read first.
const JOBS_MAX: usize = 4096;

/// Which way a lineage query walks.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Towards what the commit was derived from: parents and sources.
    Upstream,
    /// Towards what was derived from the commit: children and commits naming it a source.
    Downstream,
}

/// How one commit derives from another.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EdgeKind {
    Parent,
    Source,
}

/// `commit` derives from `from` (its parent or source).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LineageEdge {
    pub commit: CommitId,
    pub from: CommitId,
    pub kind: EdgeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LineageGraph {
    pub commit: CommitId,
    pub direction: Direction,
    /// The commits reached, the starting one first, nearest first.
    pub commits: Vec<CommitInfo>,
    pub edges: Vec<LineageEdge>,
    /// The walk stopped at `depth` or the commit limit: there is more.
    pub truncated: bool,
}

impl State {
    /// Notes that a session wrote `bytes` to a head.
    pub(crate) fn note_writer(&mut self, head_id: u64, session: &SessionInfo, bytes: u64) {
        let Some(head) = self.catalog.heads.get_mut(&head_id) else {
            return;
        };
        let lineage = &mut head.record.lineage;
        match lineage.writers.iter_mut().find(|w| w.session == session.id) {
            Some(writer) => writer.bytes_written += bytes,
            None => {
                lineage.writers.push(SessionWriter {
                    session: session.id,
                    protocol: session.client.protocol.clone(),
                    client: session.client.address.clone(),
                    job: session.job.clone(),
                    opened_unix: session.opened_unix,
                    bytes_written: bytes,
                });
                if let Some(job) = &session.job {
                    if !lineage.jobs.contains(job) {
                        lineage.jobs.push(job.clone());
                    }
                }
            }
        }
    }

    /// Notes that a session of `job` read `bytes` of `target`.
    pub(crate) fn note_read(&mut self, job: &str, target: &ResolvedRef, bytes: u64) {
        let commit = match target {
            ResolvedRef::Commit { commit, .. } | ResolvedRef::Tag { commit, .. } => Some(*commit),
            ResolvedRef::Branch { volume, branch } => self
                .catalog
                .head_id(volume, branch)
                .and_then(|id| self.catalog.head(id))
                .ok()
                .and_then(|h| h.record.base),
        };
        if let Some(commit) = commit {
            self.job_clock += 1;
            let clock = self.job_clock;
            let (reads, used) = self.jobs.entry(job.to_string()).or_default();
            *used = clock;
            let entry = reads
                .entry(commit)
                .or_insert_with(|| (target.volume().to_string(), 0));
            entry.1 += bytes;
            if self.jobs.len() > JOBS_MAX {
                self.forget_a_job();
            }
        }
    }

    /// Forgets the least recently read job that no head holds writes of.
    fn forget_a_job(&mut self) {
        let writing: Vec<&String> = self
            .catalog
            .heads
            .values()
            .flat_map(|h| h.record.lineage.jobs.iter())
            .collect();
        let oldest = self
            .jobs
            .iter()
            .filter(|(job, _)| !writing.contains(job))
            .min_by_key(|(_, (_, used))| *used)
            .map(|(job, _)| job.clone());
        if let Some(job) = oldest {
            self.jobs.remove(&job);
        }
    }

    /// The lineage of a commit of a head: who wrote it, the sources named, and what its jobs
    /// read. The head starts afresh.
    pub(crate) fn take_lineage(&mut self, head_id: u64, named: Vec<Source>) -> Result<Lineage> {
        let head = self.catalog.head_mut(head_id)?;
        let parent = head.record.base;
        let HeadLineage { writers, jobs } = std::mem::take(&mut head.record.lineage);
        // What the parent already records of a job's reads is not repeated.
        let recorded: Vec<Source> = parent
            .and_then(|p| self.catalog.commit_required(&p).ok())
            .map(|c| c.info.lineage.sources.clone())
            .unwrap_or_default();
        let mut sources = named;
        for job in &jobs {
            for (commit, (volume, bytes)) in self.jobs.get(job).into_iter().flat_map(|(r, _)| r) {
                // A job reading the branch it writes read its parent: that edge is there.
                if Some(*commit) == parent {
                    continue;
                }
                let known = recorded.iter().any(|s| {
                    s.commit == *commit && s.job.as_ref() == Some(job) && s.bytes_read >= *bytes
                });
                if known {
                    continue;
                }
                sources.push(Source {
                    commit: *commit,
                    volume: volume.clone(),
                    kind: SourceKind::Job,
                    job: Some(job.clone()),
                    bytes_read: *bytes,
                });
            }
        }
        Ok(Lineage {
            sessions: writers,
            sources,
        })
    }
}

/// Commits a lineage walk returns at most.
pub const LINEAGE_COMMITS_MAX: usize = 10_000;

impl Pool {
    /// Resolves the sources a client names for a commit of `volume`: commits, tags, or
    /// branches (their latest commits), as names in the volume or full `VOL@NAME` refs.
    pub fn named_sources(&self, volume: &str, refs: &[String]) -> Result<Vec<Source>> {
        let mut sources: Vec<Source> = Vec::new();
        for spec in refs {
            let commit = self.commit_of(volume, spec)?;
            let owner = self
                .inner
                .state
                .lock()
                .catalog
                .commit_required(&commit)?
                .info
                .volume
                .clone();
            if !sources.iter().any(|s| s.commit == commit) {
                sources.push(Source {
                    commit,
                    volume: owner,
                    kind: SourceKind::Named,
                    job: None,
                    bytes_read: 0,
                });
            }
        }
        Ok(sources)
    }

    /// Walks the lineage of a commit up to `depth` steps: upstream through parents and
    /// sources, or downstream through children and the commits naming it a source, across
    /// volumes.
    pub fn lineage(
        &self,
        volume: &str,
        commit: &str,
        direction: Direction,
        depth: usize,
    ) -> Result<LineageGraph> {
        let st = self.inner.state.lock();
        let start = st.catalog.find_commit(volume, commit)?.info.id;
        // Downstream needs the reverse edges: one pass over every commit.
        let mut derived: HashMap<CommitId, Vec<LineageEdge>> = HashMap::new();
        if direction == Direction::Downstream {
            for c in st.catalog.volumes.values().flat_map(|v| v.commits.values()) {
                for edge in edges_of(&c.info) {
                    derived.entry(edge.from).or_default().push(edge);
                }
            }
        }
        let mut graph = LineageGraph {
            commit: start,
            direction,
            commits: Vec::new(),
            edges: Vec::new(),
            truncated: false,
        };
        let mut seen: HashMap<CommitId, ()> = HashMap::new();
        let mut queue = VecDeque::from([(start, 0usize)]);
        seen.insert(start, ());
        while let Some((id, level)) = queue.pop_front() {
            let Ok(record) = st.catalog.commit_required(&id) else {
                continue;
            };
            graph.commits.push(record.info.clone());
            let next: Vec<LineageEdge> = match direction {
                Direction::Upstream => edges_of(&record.info),
                Direction::Downstream => derived.remove(&id).unwrap_or_default(),
            };
            for edge in next {
                let other = match direction {
                    Direction::Upstream => edge.from,
                    Direction::Downstream => edge.commit,
                };
                // A source deleted since (squashed, or its volume gone) is history no longer
                // walkable: the commit keeps naming it, the graph leaves it out.
                if st.catalog.commit_required(&other).is_err() {
                    continue;
                }
                if level >= depth || graph.commits.len() + queue.len() >= LINEAGE_COMMITS_MAX {
                    if !seen.contains_key(&other) {
                        graph.truncated = true;
                    }
                    continue;
                }
                graph.edges.push(edge);
                if seen.insert(other, ()).is_none() {
                    queue.push_back((other, level + 1));
                }
            }
        }
        if graph.commits.is_empty() {
            return Err(Error::not_found(format!("commit {commit:?}")));
        }
        Ok(graph)
    }
}

/// A commit's edges to what it derives from.
fn edges_of(info: &CommitInfo) -> Vec<LineageEdge> {
    let parents = info.parents.iter().map(|p| LineageEdge {
        commit: info.id,
        from: *p,
        kind: EdgeKind::Parent,
        source: None,
    });
    let sources = info.lineage.sources.iter().map(|s| LineageEdge {
        commit: info.id,
        from: s.commit,
        kind: EdgeKind::Source,
        source: Some(s.clone()),
    });
    parents.chain(sources).collect()
}
