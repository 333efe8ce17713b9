//! [`RouteState`]: the current truth about every agent and container, as a
//! pure, deterministic fold of the log.
//!
//! The fold keeps four promises (each has a property test below):
//!
//! 1. applying the same message twice equals applying it once;
//! 2. folding a log equals folding its last-message-per-subject compaction;
//! 3. a `sync` removes exactly the agent's containers missing from it;
//! 4. serialising and restoring the state changes nothing.
//!
//! Promise 2 is why a container removed by a `sync` is *suppressed* rather
//! than forgotten: its subject's last message is still its `up`, so if a
//! later `sync` of the same agent lists it again, it comes back, exactly as
//! it would when only the last message of each subject survives.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::{ContainerFacts, DecodeError, Event};
use crate::subject::AgentId;

/// The folded state of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteState {
    /// The stream sequence of the last message folded; messages at or below
    /// it are redeliveries and change nothing.
    pub last_seq: u64,
    /// Everything known per agent.
    pub agents: BTreeMap<AgentId, AgentRecord>,
}

/// What the log says about one agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The agent's address, from its latest sync.
    pub host_address: Option<String>,
    /// `sent_at_ms` of the latest heartbeat.
    pub last_heartbeat_ms: Option<u64>,
    /// Stream sequence of the latest sync.
    pub last_sync_seq: Option<u64>,
    /// Containers whose subject's last message is an `up`, by container ID.
    pub containers: BTreeMap<String, ContainerRecord>,
}

/// One container's latest facts and whether the agent still vouches for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Stream sequence of the `up` message these facts came from.
    pub seq: u64,
    /// The facts, shared: a snapshot of the state for a push copies no
    /// container's facts.
    pub facts: Arc<ContainerFacts>,
    /// False when a later `sync` of the agent did not list the container.
    pub listed: bool,
}

impl RouteState {
    /// Folds one message at stream sequence `seq` into the state.
    ///
    /// Messages must be applied in stream order; one at or below
    /// [`RouteState::last_seq`] is a redelivery and is ignored.
    pub fn apply(&mut self, seq: u64, event: &Event) {
        if seq <= self.last_seq {
            return;
        }
        self.last_seq = seq;
        let agent = self.agents.entry(event.agent().clone()).or_default();
        match event {
            Event::Up(facts) => {
                agent.containers.insert(
                    facts.id.clone(),
                    ContainerRecord {
                        seq,
                        facts: Arc::new(facts.clone()),
                        listed: true,
                    },
                );
            }
            Event::Down(down) => {
                agent.containers.remove(&down.id);
            }
            Event::Sync(sync) => {
                agent.host_address = Some(sync.host_address.clone());
                agent.last_sync_seq = Some(seq);
                for (id, record) in agent.containers.iter_mut() {
                    record.listed = sync.containers.iter().any(|listed| listed == id);
                }
            }
            Event::Heartbeat(hb) => {
                agent.last_heartbeat_ms = Some(hb.sent_at_ms);
            }
        }
    }

    /// Folds one message as read from the log: decodes it from its subject
    /// ([`Event::decode_from`]) and applies it, or, when it does not decode,
    /// skips its sequence and returns why. This is the one fold the applier
    /// (live and recovering) and the debugging commands share. Returns the
    /// agent the message came from.
    pub fn fold_message(
        &mut self,
        seq: u64,
        subject: &str,
        payload: &[u8],
    ) -> Result<AgentId, DecodeError> {
        self.fold_message_observed(seq, subject, payload, |_, _| {})
    }

    /// [`RouteState::fold_message`], with `observe` shown each decoded event
    /// and the state just before it is applied (what `history` describes
    /// changes against).
    pub fn fold_message_observed(
        &mut self,
        seq: u64,
        subject: &str,
        payload: &[u8],
        observe: impl FnOnce(&RouteState, &Event),
    ) -> Result<AgentId, DecodeError> {
        match Event::decode_from(subject, payload) {
            Ok(event) => {
                observe(self, &event);
                self.apply(seq, &event);
                Ok(event.agent().clone())
            }
            Err(error) => {
                self.skip(seq);
                Err(error)
            }
        }
    }

    /// Records that the message at `seq` was read but could not be decoded,
    /// so a checkpoint taken now resumes after it.
    pub fn skip(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// Containers the log says exist and their agent still lists, in a
    /// stable order (agent, then container ID).
    pub fn live_containers(&self) -> impl Iterator<Item = &ContainerRecord> {
        self.agents
            .values()
            .flat_map(|agent| agent.containers.values())
            .filter(|record| record.listed)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::*;
    use crate::event::{AgentSync, ContainerDown, ContainerState, Health, Heartbeat};

    const AGENTS: [&str; 3] = ["a1", "a2", "a3"];
    const CONTAINERS: [&str; 5] = ["c1", "c2", "c3", "c4", "c5"];

    fn agent(i: usize) -> AgentId {
        AgentId::new(AGENTS[i]).unwrap()
    }

    fn up(a: usize, c: usize, port: u16, running: bool) -> Event {
        Event::Up(ContainerFacts {
            agent: agent(a),
            id: CONTAINERS[c].into(),
            name: format!("n{c}"),
            host_address: format!("10.0.0.{a}"),
            labels: [("caddy".to_string(), format!("{c}.test"))].into(),
            ports: vec![],
            networks: BTreeMap::new(),
            state: if running {
                ContainerState::Running
            } else {
                ContainerState::Exited
            },
            health: Health::None,
            observed_at_ms: u64::from(port),
        })
    }

    #[test]
    fn fold_message_decodes_from_the_subject_and_skips_what_does_not_decode() {
        let event = up(0, 1, 1, true);
        let mut state = RouteState::default();
        let observed = std::cell::Cell::new(None);
        let agent = state
            .fold_message_observed(3, &event.subject(), &event.encode(), |before, e| {
                observed.set(Some((before.last_seq, e == &event)));
            })
            .unwrap();
        assert_eq!(agent, super::AgentId::new("a1").unwrap());
        assert_eq!(observed.get(), Some((0, true)), "sees the state before it");
        let mut expected = RouteState::default();
        expected.apply(3, &event);
        assert_eq!(state, expected);
        // Garbage, and a payload on another agent's subject, are skipped.
        assert!(state.fold_message(4, &event.subject(), b"garbage").is_err());
        let other = up(1, 1, 1, true);
        assert!(state
            .fold_message(5, &other.subject(), &event.encode())
            .is_err());
        expected.skip(5);
        assert_eq!(state, expected);
    }

    fn any_event() -> impl Strategy<Value = Event> {
        let a = 0..AGENTS.len();
        let c = 0..CONTAINERS.len();
        prop_oneof![
            4 => (a.clone(), c.clone(), 0u16..4, any::<bool>()).prop_map(|(a, c, p, r)| up(a, c, p, r)),
            2 => (a.clone(), c).prop_map(|(a, c)| Event::Down(ContainerDown {
                agent: agent(a), id: CONTAINERS[c].into(), observed_at_ms: 0 })),
            2 => (a.clone(), prop::collection::btree_set(0..CONTAINERS.len(), 0..=CONTAINERS.len()))
                .prop_map(|(a, set)| Event::Sync(AgentSync {
                    agent: agent(a), host_address: format!("h{a}"),
                    containers: set.into_iter().map(|c| CONTAINERS[c].to_string()).collect(),
                    observed_at_ms: 0 })),
            1 => (a, 0u64..100).prop_map(|(a, t)| Event::Heartbeat(Heartbeat { agent: agent(a), sent_at_ms: t })),
        ]
    }

    /// A log: events at strictly increasing sequences (with gaps, as a
    /// stream with deleted or filtered messages has).
    fn any_log() -> impl Strategy<Value = Vec<(u64, Event)>> {
        prop::collection::vec((1u64..4, any_event()), 0..60).prop_map(|steps| {
            let mut seq = 0;
            steps
                .into_iter()
                .map(|(gap, e)| {
                    seq += gap;
                    (seq, e)
                })
                .collect()
        })
    }

    fn fold(log: &[(u64, Event)]) -> RouteState {
        let mut state = RouteState::default();
        for (seq, e) in log {
            state.apply(*seq, e);
        }
        state
    }

    fn live_ids(state: &RouteState, a: &AgentId) -> BTreeSet<String> {
        state
            .live_containers()
            .filter(|r| &r.facts.agent == a)
            .map(|r| r.facts.id.clone())
            .collect()
    }

    proptest! {
        #[test]
        fn applying_twice_equals_applying_once(log in any_log()) {
            let once = fold(&log);
            let mut twice = RouteState::default();
            for (seq, e) in &log {
                twice.apply(*seq, e);
                twice.apply(*seq, e);
            }
            prop_assert_eq!(&once, &twice);
            // Redelivering the whole log after the fact changes nothing either.
            for (seq, e) in &log {
                twice.apply(*seq, e);
            }
            prop_assert_eq!(once, twice);
        }

        #[test]
        fn folding_the_compaction_equals_folding_the_log(log in any_log()) {
            let mut last_per_subject: HashMap<String, (u64, Event)> = HashMap::new();
            for (seq, e) in &log {
                last_per_subject.insert(e.subject(), (*seq, e.clone()));
            }
            let mut compacted: Vec<_> = last_per_subject.into_values().collect();
            compacted.sort_by_key(|(seq, _)| *seq);
            prop_assert_eq!(fold(&log), fold(&compacted));
        }

        #[test]
        fn sync_removes_exactly_the_missing_containers(
            log in any_log(),
            a in 0..AGENTS.len(),
            listed in prop::collection::btree_set(0..CONTAINERS.len(), 0..=CONTAINERS.len()),
        ) {
            let mut state = fold(&log);
            let before: Vec<BTreeSet<String>> = (0..AGENTS.len()).map(|i| live_ids(&state, &agent(i))).collect();
            let listed: BTreeSet<String> = listed.into_iter().map(|c| CONTAINERS[c].to_string()).collect();
            let seq = state.last_seq + 1;
            state.apply(seq, &Event::Sync(AgentSync {
                agent: agent(a), host_address: "h".into(),
                containers: listed.iter().cloned().collect(), observed_at_ms: 0 }));
            for (i, before_i) in before.iter().enumerate() {
                let after = live_ids(&state, &agent(i));
                if i == a {
                    let known: BTreeSet<String> = state.agents.get(&agent(a))
                        .map(|r| r.containers.keys().cloned().collect()).unwrap_or_default();
                    // Live afterwards: exactly the known containers the sync lists.
                    prop_assert_eq!(&after, &known.intersection(&listed).cloned().collect());
                    // Nothing live before and listed was removed.
                    prop_assert!(before_i.intersection(&listed).all(|c| after.contains(c)));
                } else {
                    prop_assert_eq!(&after, before_i);
                }
            }
        }

        #[test]
        fn serialising_and_restoring_changes_nothing(log in any_log(), more in any_log()) {
            let state = fold(&log);
            let json = serde_json::to_string(&state).unwrap();
            let mut restored: RouteState = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&restored, &state);
            // And the restored state keeps folding like the original.
            let mut original = state;
            let base = original.last_seq;
            for (seq, e) in &more {
                original.apply(base + seq, e);
                restored.apply(base + seq, e);
            }
            prop_assert_eq!(original, restored);
        }
    }

    #[test]
    fn down_removes_and_up_restores() {
        let mut s = RouteState::default();
        s.apply(1, &up(0, 0, 1, true));
        assert_eq!(s.live_containers().count(), 1);
        s.apply(
            2,
            &Event::Down(ContainerDown {
                agent: agent(0),
                id: "c1".into(),
                observed_at_ms: 0,
            }),
        );
        assert_eq!(s.live_containers().count(), 0);
        s.apply(1, &up(0, 0, 1, true));
        assert_eq!(
            s.live_containers().count(),
            0,
            "a redelivered old message must not resurrect"
        );
    }
}
