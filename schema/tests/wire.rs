//! The wire format of this release, as a fixture: `testdata/wire/v1.txt`
//! holds one message per kind (`subject`, tab, payload) exactly as this
//! release's publishers write them.
//!
//! - Every fixture message decodes: an applier of this release (and any
//!   later one that keeps schema version 1) reads what publishers of this
//!   release send.
//! - Encoding the same events gives the same bytes: a publisher of this
//!   release writes what appliers of this release read.
//! - A message of a later schema version is refused with a message saying
//!   which side to upgrade, and a current applier never misreads it.
//!
//! Changing the wire format means a new schema version and a new fixture,
//! never editing this one. `UPDATE_WIRE_FIXTURE=1` writes the file when it
//! is missing.

use std::collections::BTreeMap;

use caddy_fleet_schema::event::{ContainerState, Health, PortBinding};
use caddy_fleet_schema::{
    AgentId, AgentSync, ContainerDown, ContainerFacts, DecodeError, Event, Heartbeat,
};

fn events() -> Vec<Event> {
    let agent = AgentId::new("web-1").unwrap();
    vec![
        Event::Up(ContainerFacts {
            agent: agent.clone(),
            id: "4f2c9d1e".into(),
            name: "shop".into(),
            host_address: "10.0.0.7".into(),
            labels: BTreeMap::from([
                ("caddy".to_string(), "shop.example.com".to_string()),
                (
                    "caddy.reverse_proxy".to_string(),
                    "{{upstreams 8080}}".to_string(),
                ),
            ]),
            ports: vec![PortBinding {
                container_port: 8080,
                protocol: "tcp".into(),
                host_ip: "0.0.0.0".into(),
                host_port: 32768,
            }],
            networks: BTreeMap::from([("front".to_string(), "172.18.0.5".to_string())]),
            state: ContainerState::Running,
            health: Health::Healthy,
            observed_at_ms: 1_764_400_000_000,
        }),
        Event::Down(ContainerDown {
            agent: agent.clone(),
            id: "4f2c9d1e".into(),
            observed_at_ms: 1_764_400_001_000,
        }),
        Event::Sync(AgentSync {
            agent: agent.clone(),
            host_address: "10.0.0.7".into(),
            containers: vec!["4f2c9d1e".into(), "77aa01".into()],
            observed_at_ms: 1_764_400_002_000,
        }),
        Event::Heartbeat(Heartbeat {
            agent,
            sent_at_ms: 1_764_400_003_000,
        }),
    ]
}

fn render(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| {
            let payload = String::from_utf8(e.encode()).unwrap();
            format!("{}\t{payload}\n", e.subject())
        })
        .collect()
}

#[test]
fn this_releases_wire_format_is_read_and_written_unchanged() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/wire/v1.txt");
    let fixture = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(_) if std::env::var_os("UPDATE_WIRE_FIXTURE").is_some() => {
            std::fs::write(path, render(&events())).unwrap();
            std::fs::read_to_string(path).unwrap()
        }
        Err(e) => panic!("{path}: {e}"),
    };
    let mut decoded = Vec::new();
    for line in fixture.lines() {
        let (subject, payload) = line.split_once('\t').expect("subject<TAB>payload");
        decoded.push(
            Event::decode_from(subject, payload.as_bytes())
                .unwrap_or_else(|e| panic!("{subject}: {e}")),
        );
    }
    assert_eq!(decoded, events(), "the fixture decodes to other events");
    assert_eq!(
        render(&events()),
        fixture,
        "this build writes the wire format differently: a new schema version, not an edit"
    );
}

#[test]
fn a_later_schema_version_is_refused_naming_the_side_to_upgrade() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/wire/v1.txt");
    let fixture = std::fs::read_to_string(path).expect("the wire fixture");
    for line in fixture.lines() {
        let (subject, payload) = line.split_once('\t').unwrap();
        let later = payload.replacen("\"v\":1", "\"v\":2", 1);
        assert_ne!(later, payload, "the fixture names its version");
        let error = Event::decode_from(subject, later.as_bytes()).unwrap_err();
        assert!(
            matches!(error, DecodeError::UnknownVersion { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("upgrade the applier"), "{error}");
    }
}
