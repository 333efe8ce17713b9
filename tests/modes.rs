//! Modes and packaging: standalone mode end to end without NATS, the
//! shipped NATS config's permissions, and the one-line config errors.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use caddy_fleet::applier::{ApplierConfig, StatusBoard};
use caddy_fleet::nats::async_nats::jetstream;
use caddy_fleet::nats::{
    connect, ensure_agent_stream, ensure_stream, EventPublisher, NatsAuth, NatsConfig,
    StreamSettings,
};
use caddy_fleet::publisher::{FilterLabel, PublisherConfig};
use caddy_fleet::schema::{AgentId, Event, Heartbeat};
use support::*;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_mode_routes_a_labeled_container_without_nats() {
    let id = unique();
    let caddy = Caddy::start().await;
    let mut publisher = PublisherConfig::new(AgentId::new("solo").unwrap(), "127.0.0.1");
    publisher.filter_label = Some(FilterLabel {
        key: "caddy-fleet-test".into(),
        value: Some(id.clone()),
    });
    let mut applier = ApplierConfig::new("solo", caddy.admin_url());
    applier.base_caddyfile = Some(caddy.base_caddyfile());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(caddy_fleet::modes::run_standalone(
        publisher,
        applier,
        Arc::new(StatusBoard::default()),
        async {
            let _ = stopped.await;
        },
    ));
    let domain = format!("{id}.solo.test");
    let backend = start_backend(&web_labels(&domain, &id), "solo").await;
    caddy
        .wait_serving(&domain, "solo", Duration::from_secs(30))
        .await;
    backend.stop().await.unwrap();
    wait_for(
        "standalone to remove the route",
        Duration::from_secs(30),
        || async { (!caddy_routes(&caddy).await?.contains_key(&domain)).then_some(()) },
    )
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

fn user(url: &str, user: &str, password: &str, inbox: Option<&str>) -> NatsConfig {
    NatsConfig {
        urls: vec![url.to_string()],
        auth: NatsAuth::UserPassword {
            user: user.into(),
            password: password.into(),
        },
        inbox_prefix: inbox.map(str::to_string),
        subscription_capacity: None,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nats_config_confines_each_agent_to_its_subjects() {
    let conf = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/compose/nats/nats.conf"
    ))
    .unwrap();
    let (_nats, url) = nats_with_config(conf).await;

    // The applier manages the stream.
    let applier = connect(&user(&url, "applier", "pw-applier", None))
        .await
        .unwrap();
    let applier_js = jetstream::new(applier.clone());
    // The applier's user has only what it needs: it cannot speak for a host.
    let strict = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(applier);
    let stream = ensure_stream(&applier_js, &StreamSettings::default())
        .await
        .unwrap();
    for agent in ["agent1", "agent2"] {
        ensure_agent_stream(
            &applier_js,
            &StreamSettings::default(),
            &AgentId::new(agent).unwrap(),
        )
        .await
        .unwrap();
    }

    // agent1 publishes (and gets its ack) on its own subjects…
    let agent1 = connect(&user(&url, "agent1", "pw-agent1", Some("_INBOX_agent1")))
        .await
        .unwrap();
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(agent1);
    let mut own =
        EventPublisher::new(js.clone(), AgentId::new("agent1").unwrap(), "t").with_max_attempts(1);
    let hb = |agent: &str| {
        Event::Heartbeat(Heartbeat {
            agent: AgentId::new(agent).unwrap(),
            sent_at_ms: 1,
        })
    };
    own.publish(&hb("agent1"))
        .await
        .expect("agent1 may publish on fleet.agent1.>");
    // …but not on agent2's, …
    let mut forged =
        EventPublisher::new(js.clone(), AgentId::new("agent2").unwrap(), "t").with_max_attempts(1);
    assert!(
        forged.publish(&hb("agent2")).await.is_err(),
        "agent1 must not publish on fleet.agent2.>"
    );
    // …and not on JetStream's API.
    assert!(
        js.get_stream("CADDY_FLEET").await.is_err(),
        "agent1 must not use $JS.API"
    );
    assert!(
        js.delete_stream("CADDY_FLEET").await.is_err(),
        "agent1 must not delete the stream"
    );
    assert_eq!(
        wait_for_log(&stream, 1).await,
        1,
        "only agent1's own message was stored"
    );

    assert!(
        strict
            .publish("fleet.agent1.hb", "forged".into())
            .await
            .unwrap()
            .await
            .is_err(),
        "the applier's user must not publish on an agent's subjects"
    );

    // No ack reflection: JetStream acks a publish to whatever reply subject
    // the publisher names. Through the service import the reply is
    // rewritten, so nothing lands outside agent1's own account.
    let checkpoints = applier_js
        .create_object_store(jetstream::object_store::Config {
            bucket: "CADDY_FLEET_CHECKPOINTS".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(checkpoints);
    let raw = connect(&user(&url, "agent1", "pw-agent1", Some("_INBOX_agent1")))
        .await
        .unwrap();
    for reply in [
        "fleet.agent2.ctr.reflected",
        "$O.CADDY_FLEET_CHECKPOINTS.M.reflected",
        "$JS.API.STREAM.DELETE.CADDY_FLEET",
        "$JS.API.STREAM.PURGE.CADDY_FLEET_IN_agent2",
    ] {
        raw.publish_with_reply("fleet.agent1.ctr.bait", reply.to_string(), "x".into())
            .await
            .unwrap();
    }
    raw.flush().await.unwrap();
    // A last acked message: once the log has it, every ack before it went out.
    own.publish(&hb("agent1")).await.unwrap();
    let last = wait_for_log(&stream, 6).await;
    let mut log = applier_js.get_stream("CADDY_FLEET").await.unwrap();
    assert_eq!(
        log.info().await.unwrap().state.messages,
        6,
        "the heartbeat, four baits and the last heartbeat; no reflected ack (last seq {last})"
    );
    for (name, what) in [
        ("CADDY_FLEET_IN_agent2", "agent2's ingest stream"),
        ("OBJ_CADDY_FLEET_CHECKPOINTS", "the checkpoint store"),
    ] {
        let mut reflected = applier_js.get_stream(name).await.unwrap();
        assert_eq!(
            reflected.info().await.unwrap().state.messages,
            0,
            "an ack was reflected into {what}"
        );
    }
    let mut agent1_ingest = applier_js
        .get_stream("CADDY_FLEET_IN_agent1")
        .await
        .unwrap();
    assert_eq!(agent1_ingest.info().await.unwrap().state.messages, 6);

    // No credentials, or wrong ones: refused, and said so.
    let anonymous = connect(&NatsConfig {
        urls: vec![url.clone()],
        ..Default::default()
    })
    .await;
    assert!(
        anonymous.as_ref().is_err_and(|e| e.is_auth_failure()),
        "{:?}",
        anonymous.err()
    );
    let wrong = connect(&user(&url, "agent1", "nope", None))
        .await
        .unwrap_err();
    assert!(
        wrong.to_string().contains("refused the credentials"),
        "{wrong}"
    );
}

fn run_fleet(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_caddy-fleet"));
    command.args(args).env("HOST_IP", "127.0.0.1");
    for key in [
        "AGENT_ID",
        "NATS_URL",
        "NATS_CREDS_FILE",
        "AGENT_MODE",
        "CADDY_API_URL",
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
    ] {
        command.env_remove(key);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

fn assert_one_line_error(result: (bool, String), expected: &str) {
    let (ok, stderr) = result;
    assert!(!ok, "start-up should fail");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(
        stderr.contains(expected),
        "{stderr:?} should contain {expected:?}"
    );
}

#[test]
fn config_errors_stop_start_up_with_one_line_naming_the_setting() {
    let dir = std::env::temp_dir().join(format!("caddy-fleet-config-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fleet.toml");
    std::fs::write(
        &file,
        "agent_id = \"web-1\"\nnats_urll = \"nats://nats:4222\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();

    assert_one_line_error(
        run_fleet(&["--config", file, "agent"], &[]),
        "unknown setting `nats_urll`",
    );
    assert_one_line_error(
        run_fleet(&["agent"], &[("NATS_URL", "nats://bad host:x")]),
        "NATS_URL: malformed URL",
    );
    assert_one_line_error(
        run_fleet(&["applier", "--caddy-api-url", "localhost:2019"], &[]),
        "CADDY_API_URL: malformed URL",
    );
    assert_one_line_error(
        run_fleet(&["agent"], &[("AGENT_ID", "web.1")]),
        "AGENT_ID: invalid agent ID \"web.1\"",
    );
    assert_one_line_error(
        run_fleet(&["agent", "--agent-id", "web 1"], &[("AGENT_ID", "fine")]),
        "AGENT_ID: invalid agent ID \"web 1\"",
    );
    assert_one_line_error(
        run_fleet(
            &["agent"],
            &[("NATS_CREDS_FILE", "/nonexistent/agent.creds")],
        ),
        "NATS_CREDS_FILE: cannot read /nonexistent/agent.creds",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn settings_errors_are_one_line_with_exit_status_1_even_with_backtraces_on() {
    let dir = std::env::temp_dir().join(format!("caddy-fleet-config-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fleet.toml");
    std::fs::write(&file, "docker_label_prefix = \"fleet\"\n").unwrap();
    let file = file.to_str().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_caddy-fleet"));
        command
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .env("HOST_IP", "127.0.0.1")
            .env_remove("DOCKER_LABEL_PREFIX")
            .stdin(std::process::Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    };
    for (args, env, expected) in [
        (
            &["agent"][..],
            &[("STREAM_MAX_AGE", "300000000000000d")][..],
            "error: STREAM_MAX_AGE: \"300000000000000d\" is too long",
        ),
        (
            &["agent", "--stream-replicas", "9"],
            &[],
            "error: STREAM_REPLICAS: 9 replicas",
        ),
        (
            &["--config", "/nonexistent/fleet.toml", "agent"],
            &[],
            "error: --config /nonexistent/fleet.toml: cannot read it",
        ),
        // `labels` reads the same settings: the file's prefix applies.
        (
            &["labels", "--config", file, "/dev/null"],
            &[],
            "error: no labels under the prefix \"fleet\"",
        ),
    ] {
        let (code, stderr) = run(args, env);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
        assert!(
            stderr.starts_with(expected),
            "{stderr:?} should start with {expected:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// NATS started from `conf` with the shipped password variables set.
async fn nats_with_config(conf: Vec<u8>) -> (testcontainers::ContainerAsync<GenericImage>, String) {
    ensure_images();
    let nats = GenericImage::new(NATS_IMAGE.0, NATS_IMAGE.1)
        .with_exposed_port(4222.tcp())
        .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
        .with_cmd(["--config", "/etc/nats/nats.conf"])
        .with_copy_to("/etc/nats/nats.conf", conf)
        .with_env_var("NATS_APPLIER_PASSWORD", "pw-applier")
        .with_env_var("NATS_AGENT1_PASSWORD", "pw-agent1")
        .with_env_var("NATS_AGENT2_PASSWORD", "pw-agent2")
        .start()
        .await
        .unwrap();
    let url = format!(
        "nats://127.0.0.1:{}",
        nats.get_host_port_ipv4(4222).await.unwrap()
    );
    (nats, url)
}

/// `agent add` makes a host that can publish its own facts and is granted
/// its sites; `agent revoke` takes all of it away again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_add_and_revoke_manage_a_hosts_account_policy_and_credentials() {
    let dir = std::env::temp_dir().join(format!("caddy-fleet-agents-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let conf = dir.join("nats.conf");
    let policy = dir.join("policy.toml");
    std::fs::copy(format!("{root}/compose/nats/nats.conf"), &conf).unwrap();
    std::fs::copy(format!("{root}/compose/policy.toml"), &policy).unwrap();
    let admin = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
            .arg("agent")
            .args(args)
            .arg("--nats-config")
            .arg(&conf)
            .arg("--policy")
            .arg(&policy)
            .arg("--credentials-dir")
            .arg(&dir)
            .env_remove("POLICY_FILE")
            .output()
            .unwrap()
    };
    let out = admin(&["add", "web-9", "--domain", "web9.test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second add of the same ID is refused, changing nothing.
    let again = admin(&["add", "web-9"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let env = std::fs::read_to_string(dir.join("web-9.env")).unwrap();
    let password = env
        .lines()
        .find_map(|l| l.strip_prefix("NATS_PASSWORD="))
        .unwrap()
        .to_string();
    let parsed =
        caddy_fleet::schema::policy::Policy::parse(&std::fs::read_to_string(&policy).unwrap())
            .unwrap();
    let grant = parsed.grant(&AgentId::new("web-9").unwrap()).unwrap();
    assert!(grant.allows_domain("web9.test") && !grant.trusted);
    assert!(
        parsed.grant(&AgentId::new("agent1").unwrap()).is_ok(),
        "other entries kept"
    );

    // NATS takes the new account: the host publishes on its own subjects.
    let (_nats, url) = nats_with_config(std::fs::read(&conf).unwrap()).await;
    let applier = jetstream::new(
        connect(&user(&url, "applier", "pw-applier", None))
            .await
            .unwrap(),
    );
    ensure_stream(&applier, &StreamSettings::default())
        .await
        .unwrap();
    let web9 = AgentId::new("web-9").unwrap();
    ensure_agent_stream(&applier, &StreamSettings::default(), &web9)
        .await
        .unwrap();
    let host = connect(&user(&url, "web-9", &password, Some("_INBOX_web-9")))
        .await
        .unwrap();
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(host);
    EventPublisher::new(js, web9.clone(), "t")
        .with_max_attempts(1)
        .publish(&Event::Heartbeat(Heartbeat {
            agent: web9,
            sent_at_ms: 1,
        }))
        .await
        .expect("the new host may publish on fleet.web-9.>");

    // Revoked: no account, no policy entry, no credentials file.
    let out = admin(&["revoke", "web-9"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.join("web-9.env").exists());
    let parsed =
        caddy_fleet::schema::policy::Policy::parse(&std::fs::read_to_string(&policy).unwrap())
            .unwrap();
    assert!(parsed.grant(&AgentId::new("web-9").unwrap()).is_err());
    let (_revoked, url) = nats_with_config(std::fs::read(&conf).unwrap()).await;
    let refused = connect(&user(&url, "web-9", &password, None)).await;
    assert!(refused.is_err_and(|e| e.is_auth_failure()));
    let agent1 = connect(&user(&url, "agent1", "pw-agent1", None)).await;
    assert!(agent1.is_ok(), "other hosts keep their accounts");
    let _ = std::fs::remove_dir_all(&dir);
}
