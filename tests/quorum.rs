//! The log losing its majority, on a real 3-node NATS cluster: two nodes
//! killed for twice `AGENT_TTL` while the agents keep trying to send their
//! heartbeats. The applier must say the log does not answer
//! (`caddy_fleet_log_answers 0`), expire no agent for a silence the log
//! caused, keep every route in Caddy, and carry on once the nodes are back.

mod chaos_harness;
mod support;

use std::time::{Duration, Instant};

use caddy_fleet::nats::StreamSettings;
use chaos_harness::{ApplierProcess, Cluster, Fleet};
use support::*;

/// The applier's `/metrics` has `line`.
async fn metrics_have(applier: &ApplierProcess, line: &str) -> Option<()> {
    let url = format!("{}/metrics", applier.status_url());
    let client = reqwest::Client::builder().no_proxy().build().ok()?;
    let text = client.get(&url).send().await.ok()?.text().await.ok()?;
    text.lines().any(|l| l == line).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_without_its_majority_expires_no_agent_and_keeps_every_route() {
    const TTL: Duration = Duration::from_secs(8);
    let (cluster, caddy) = tokio::join!(Cluster::start(), Caddy::start());
    let applier = ApplierProcess::start_with(&cluster, &caddy, "quorum", &[("AGENT_TTL", "8s")]);
    cluster.log_created().await;
    let settings = StreamSettings {
        replicas: 3,
        ..StreamSettings::default()
    };
    let fleet = Fleet::start(&cluster, &settings, 6, 2).await;
    // The agents' publishers: a heartbeat a second, whatever NATS does.
    let beating = async {
        let mut every_second = tokio::time::interval(Duration::from_secs(1));
        loop {
            every_second.tick().await;
            fleet.heartbeat().await;
        }
    };
    let checking = async {
        wait_for(
            "the fleet to be served",
            Duration::from_secs(60),
            || async { (fleet.check(&caddy).await == (0, 0)).then_some(()) },
        )
        .await;
        wait_for("the log to answer", Duration::from_secs(30), || {
            metrics_have(&applier, "caddy_fleet_log_answers 1")
        })
        .await;

        // Two of three nodes down: no majority, no leader, no writes.
        let down: Vec<String> = cluster.nodes[..2].iter().map(|n| n.0.clone()).collect();
        for node in &down {
            cluster.kill(node);
        }
        let outage = Instant::now();
        wait_for(
            "the applier to see the log not answer",
            Duration::from_secs(30),
            || metrics_have(&applier, "caddy_fleet_log_answers 0"),
        )
        .await;
        // Twice the TTL without a word from any agent: every route stays.
        let mut checks = 0;
        let mut twice_a_second = tokio::time::interval(Duration::from_millis(500));
        while outage.elapsed() < 2 * TTL {
            twice_a_second.tick().await;
            let wrong = fleet.wrong(&caddy).await;
            assert!(
                wrong.is_empty(),
                "{:.1} s into the log's outage: {wrong:?}",
                outage.elapsed().as_secs_f64()
            );
            checks += 1;
        }
        for node in &down {
            cluster.start_node(node);
        }
        wait_for("the log to answer again", Duration::from_secs(90), || {
            metrics_have(&applier, "caddy_fleet_log_answers 1")
        })
        .await;
        let back = Instant::now();
        // Agents heard again, and a change after the outage is served.
        fleet.churn(4, Duration::from_millis(50)).await;
        wait_for(
            "the fleet to be served after the outage",
            Duration::from_secs(60),
            || async { (fleet.check(&caddy).await == (0, 0)).then_some(()) },
        )
        .await;
        let expired = applier.log_lines("Agent silent longer than AGENT_TTL");
        assert_eq!(
            expired, 0,
            "an agent was expired during or after the outage"
        );
        println!(
            "quorum: {} s without a majority, {checks} checks of every route through Caddy, all served; served again {:.2} s after the log answered; agents expired: {expired}",
            (back - outage).as_secs(),
            back.elapsed().as_secs_f64()
        );
    };
    tokio::select! {
        // The heartbeats never end.
        () = beating => unreachable!("the heartbeat loop ended"),
        // The test's checks.
        () = checking => {}
    }
}
