//! The trust boundary end to end (real NATS, real Caddy, real containers):
//! an agent the policy does not trust tries each way to reach beyond its
//! grant with labels alone. Every attempt is refused by policy and shown in
//! `/status`; the owner's site stays served, Caddy's admin endpoint stays
//! where the base Caddyfile puts it, and the applier keeps consuming.

mod support;

use std::time::Duration;

use caddy_fleet::schema::policy::Policy;
use caddy_fleet::schema::translate::TranslateOptions;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_agent_cannot_reach_beyond_its_grant() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let owner = format!("owner-{id}");
    let attacker = format!("attacker-{id}");
    let owner_site = format!("owner-{id}.test");
    let attacker_site = format!("attacker-{id}.test");
    let policy_text = |attacker_domains: &str| {
        format!(
            "[agents.{owner}]\ndomains = [\"{owner_site}\"]\ntrusted = true\n\n\
             [agents.{attacker}]\ndomains = [{attacker_domains}]\n"
        )
    };
    let dir = std::env::temp_dir().join(format!("caddy-fleet-policy-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let policy_path = dir.join("policy.toml");
    // The attacker is granted its own site and, as in a multi-host
    // deployment, the owner's too: only identical declarations may share it.
    let granted = format!("\"{attacker_site}\", \"{owner_site}\"");
    std::fs::write(&policy_path, policy_text(&granted)).unwrap();
    let path = policy_path.clone();
    let (applier, board) = start_applier_with(&nats, &caddy, "policy", move |c| {
        c.translate = TranslateOptions {
            policy: Policy::parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            ..TranslateOptions::default()
        };
        c.policy_file = Some(path);
    });

    let owner_filter = format!("{id}-o");
    let attacker_filter = format!("{id}-a");
    let owner_pub = start_publisher(&nats, &owner, &owner_filter, "127.0.0.1");
    let attacker_pub = start_publisher(&nats, &attacker, &attacker_filter, "127.0.0.1");
    let _owner_backend = start_backend(&web_labels(&owner_site, &owner_filter), "owner").await;
    caddy
        .wait_serving(&owner_site, "owner", Duration::from_secs(30))
        .await;

    let admin = format!("127.0.0.1:{}", caddy.admin_port);
    let on = |site: &str| format!("http://{site}");
    let attacks: Vec<(&str, Vec<(&str, String)>)> = vec![
        // Caddy's admin API exposed on a public site.
        (
            "admin-api",
            vec![
                ("caddy", on(&attacker_site)),
                ("caddy.reverse_proxy", admin.clone()),
                ("caddy.reverse_proxy.header_up", format!("Host {admin}")),
            ],
        ),
        // A global option moving the admin endpoint.
        (
            "global-option",
            vec![
                ("caddy", on(&attacker_site)),
                ("caddy.respond", "x".into()),
                ("caddy_9.admin", "0.0.0.0:2999".into()),
            ],
        ),
        // Reading Caddy's files and secrets.
        (
            "file-server",
            vec![
                ("caddy", on(&attacker_site)),
                ("caddy.root", "* /".into()),
                ("caddy.file_server", String::new()),
            ],
        ),
        (
            "env-secret",
            vec![
                ("caddy", on(&attacker_site)),
                ("caddy.respond", "{env.HOME}".into()),
            ],
        ),
        // Taking over the owner's site by declaring it too.
        (
            "takeover",
            vec![
                ("caddy", on(&owner_site)),
                ("caddy.0_respond", "pwned".into()),
            ],
        ),
        // A catch-all site.
        (
            "catch-all",
            vec![("caddy", ":80".into()), ("caddy.respond", "pwned".into())],
        ),
    ];
    let mut containers = Vec::new();
    for (name, labels) in &attacks {
        let mut labels = labels.clone();
        labels.push(("caddy-fleet-test", attacker_filter.clone()));
        containers.push(start_backend(&labels, &format!("attack-{name}")).await);
    }
    // A quote breaking out of its label value: accepted (it is a granted
    // site), but it stays one token of one line.
    let breakout = format!("x\" }} {owner_site} {{ respond pwned");
    let quoting = start_backend(
        &[
            ("caddy", on(&attacker_site)),
            ("caddy.respond", format!("`{breakout}`")),
            ("caddy-fleet-test", attacker_filter.clone()),
        ],
        "quoting",
    )
    .await;
    caddy
        .wait_serving(&attacker_site, &breakout, Duration::from_secs(30))
        .await;

    // Every attack is refused by policy, with a reason.
    let refused = wait_for(
        "every attack to be refused by policy",
        Duration::from_secs(30),
        || async {
            let view = board.view();
            let by_policy: Vec<_> = view.rejected.iter().filter(|r| r.by == "policy").collect();
            (by_policy.len() >= attacks.len()).then_some(
                by_policy
                    .iter()
                    .map(|r| r.reason.clone())
                    .collect::<Vec<_>>(),
            )
        },
    )
    .await;
    for needle in [
        "loopback",
        "global options",
        "\"root\"",
        "{env.",
        "is served by agent",
        "host name",
    ] {
        assert!(
            refused.iter().any(|r| r.contains(needle)),
            "no refusal mentions {needle:?}: {refused:#?}"
        );
    }
    assert!(refused.iter().any(|r| r.contains(&owner)), "{refused:#?}");
    let metrics = board.metrics();
    assert!(
        metrics.contains(&format!(
            "caddy_fleet_refused_containers{{by=\"policy\"}} {}",
            attacks.len()
        )),
        "{metrics}"
    );

    // The owner still serves its site; Caddy's admin endpoint is where the
    // base Caddyfile puts it; nothing answers the catch-all.
    assert_eq!(
        caddy.get(&owner_site).await,
        Some((200, "owner".to_string()))
    );
    let config = caddy.config().await.unwrap();
    assert_eq!(config["admin"]["listen"], serde_json::json!(admin));
    assert_ne!(
        caddy.get("anything-else.test").await.map(|(_, body)| body),
        Some("pwned".to_string())
    );

    // A policy change is picked up without a restart: revoking the
    // attacker's own site refuses its last served container.
    std::fs::write(&policy_path, policy_text(&format!("\"{owner_site}\""))).unwrap();
    wait_for(
        "the revoked site to stop answering",
        Duration::from_secs(30),
        || async {
            caddy
                .get(&attacker_site)
                .await
                .filter(|(_, body)| *body != breakout)
        },
    )
    .await;

    // And the applier still consumes: a new container of the owner is served.
    let second_site = format!("second-{id}.test");
    std::fs::write(
        &policy_path,
        policy_text(&format!("\"{owner_site}\"")).replace(
            &format!("domains = [\"{owner_site}\"]\ntrusted"),
            &format!("domains = [\"{owner_site}\", \"{second_site}\"]\ntrusted"),
        ),
    )
    .unwrap();
    let _second = start_backend(&web_labels(&second_site, &owner_filter), "second").await;
    caddy
        .wait_serving(&second_site, "second", Duration::from_secs(30))
        .await;
    assert_eq!(
        caddy.get(&owner_site).await,
        Some((200, "owner".to_string()))
    );

    drop(quoting);
    drop(containers);
    owner_pub.stop().await;
    attacker_pub.stop().await;
    applier.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
