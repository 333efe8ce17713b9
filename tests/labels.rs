//! Label translation through the whole system: the `caddy-fleet labels`
//! command against caddy-docker-proxy's golden files, one domain served
//! from two agents, and a broken container next to a good one.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

fn golden_files() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/testdata/cdp/labels");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 14, "golden files missing: {files:?}");
    files
}

#[test]
fn labels_command_reproduces_every_golden_file() {
    for path in golden_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let expected = text.split_once("----------").unwrap().1.trim();
        let out = Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
            .args(["labels", "--upstreams", "target"])
            .arg(&path)
            .env_remove("DOCKER_LABEL_PREFIX")
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        if expected.is_empty() {
            assert!(
                !out.status.success(),
                "{}: expected failure, got {stdout}",
                path.display()
            );
            assert!(
                stderr.contains("label caddy.key"),
                "{}: error must name the label: {stderr}",
                path.display()
            );
            assert!(stdout.is_empty());
        } else {
            assert!(out.status.success(), "{}: {stderr}", path.display());
            assert_eq!(stdout.trim_end(), expected, "{}", path.display());
        }
    }
}

#[test]
fn labels_command_reads_stdin_and_resolves_upstreams() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
        .args(["labels", "--upstreams", "10.0.0.2,10.0.0.1"])
        .env_remove("DOCKER_LABEL_PREFIX")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"caddy = a.test\ncaddy.reverse_proxy = {{upstreams https 443}}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "a.test {\n\treverse_proxy https://10.0.0.1:443 https://10.0.0.2:443\n}\n"
    );
}

/// `labels --agent ID` prints what the applier would accept from that
/// agent under the policy; a refusal is one line on stderr and exit 1.
#[test]
fn labels_command_applies_an_agents_policy() {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("caddy-fleet-labels-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, "[agents.web-1]\ndomains = [\"a.test\"]\n").unwrap();
    let run = |agent: &str, labels: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
            .args(["labels", "--upstreams", "10.0.0.2", "--agent", agent])
            .arg("--policy-file")
            .arg(&policy)
            .env_remove("DOCKER_LABEL_PREFIX")
            .env_remove("POLICY_FILE")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(labels.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let ok = run(
        "web-1",
        "caddy = a.test\ncaddy.reverse_proxy = {{upstreams 80}}\n",
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8(ok.stdout).unwrap(),
        "a.test {\n\treverse_proxy 10.0.0.2:80\n}\n"
    );
    for (agent, labels, needle) in [
        (
            "web-1",
            "caddy = b.test\ncaddy.respond = x\n",
            "not among the domains",
        ),
        (
            "web-1",
            "caddy = a.test\ncaddy.reverse_proxy = 127.0.0.1:2019\n",
            "loopback",
        ),
        (
            "web-1",
            "caddy = a.test\ncaddy_1.admin = :2020\n",
            "global options",
        ),
        (
            "other",
            "caddy = a.test\ncaddy.respond = x\n",
            "[agents.other]",
        ),
    ] {
        let out = run(agent, labels);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{labels}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{labels}: {stderr}");
        assert!(out.stdout.is_empty());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_command_translates_a_live_container() {
    let id = unique();
    let backend = start_backend(&web_labels(&format!("{id}.live.test"), &id), "live").await;
    let port = backend.get_host_port_ipv4(80).await.unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_caddy-fleet"))
        .args([
            "labels",
            "--host-ip",
            "127.0.0.9",
            "--container",
            backend.id(),
        ])
        .env_remove("DOCKER_LABEL_PREFIX")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("http://{id}.live.test {{\n\treverse_proxy 127.0.0.9:{port}\n}}\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_domain_on_two_agents_is_load_balanced_and_survives_losing_one() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (applier, _) = start_applier(&nats, &caddy, "lb");
    // Two simulated hosts: distinct agent IDs, filters and loopback addresses.
    let (filter_a, filter_b) = (format!("{id}-a"), format!("{id}-b"));
    let pub_a = start_publisher(&nats, &format!("a-{id}"), &filter_a, "127.0.0.2");
    let pub_b = start_publisher(&nats, &format!("b-{id}"), &filter_b, "127.0.0.3");
    let domain = format!("{id}.lb.test");
    let (labels_a, labels_b) = (
        web_labels(&domain, &filter_a),
        web_labels(&domain, &filter_b),
    );
    let (backend_a, _backend_b) = tokio::join!(
        start_backend(&labels_a, "from-a"),
        start_backend(&labels_b, "from-b"),
    );

    wait_for(
        "both agents' upstreams in one site",
        Duration::from_secs(30),
        || async {
            let config = caddy.config().await?.to_string();
            (config.contains("127.0.0.2:") && config.contains("127.0.0.3:")).then_some(())
        },
    )
    .await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        if let Some((200, body)) = caddy.get(&domain).await {
            seen.insert(body);
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["from-a", "from-b"]);

    backend_a.stop().await.unwrap();
    wait_for(
        "agent a's upstream to leave",
        Duration::from_secs(30),
        || async {
            let config = caddy.config().await?.to_string();
            (!config.contains("127.0.0.2:") && config.contains("127.0.0.3:")).then_some(())
        },
    )
    .await;
    for _ in 0..10 {
        assert_eq!(caddy.get(&domain).await, Some((200, "from-b".to_string())));
    }
    pub_a.stop().await;
    pub_b.stop().await;
    applier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_container_is_reported_and_the_good_one_still_routed() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (applier, stats) = start_applier(&nats, &caddy, "broken");
    let publisher = start_publisher(&nats, &format!("x-{id}"), &id, "127.0.0.1");
    let good = format!("{id}.good.test");
    let mut broken_labels = web_labels(&format!("{id}.broken.test"), &id);
    broken_labels[1].1 = "{{upstreams 8080}}".into();
    let mut bad_template = web_labels(&format!("{id}.template.test"), &id);
    bad_template.push(("caddy.respond", "{{nonsense}}".into()));
    let good_labels = web_labels(&good, &id);
    let (_good, broken, template) = tokio::join!(
        start_backend(&good_labels, "good"),
        start_backend(&broken_labels, "broken"),
        start_backend(&bad_template, "template"),
    );
    caddy
        .wait_serving(&good, "good", Duration::from_secs(30))
        .await;
    let rejected = wait_for(
        "both broken containers reported",
        Duration::from_secs(10),
        || async {
            let rejected = stats.stats.rejected();
            (rejected.len() == 2).then_some(rejected)
        },
    )
    .await;
    let reason = |cid: &str| {
        rejected
            .iter()
            .find(|r| r.container_id == cid)
            .map(|r| r.reason.clone())
            .unwrap_or_else(|| panic!("{cid} not reported: {rejected:?}"))
    };
    let broken_name = rejected
        .iter()
        .find(|r| r.container_id == broken.id())
        .unwrap()
        .container
        .clone();
    assert_eq!(
        reason(broken.id()),
        format!(
            "label caddy.reverse_proxy: no published port for 8080/tcp on container {broken_name}"
        )
    );
    assert_eq!(
        reason(template.id()),
        "label caddy.respond: function \"nonsense\" not defined"
    );
    assert_eq!(stats.stats.snapshot().rejected_containers, 2);
    let config = caddy.config().await.unwrap().to_string();
    assert!(
        !config.contains("broken.test") && !config.contains("template.test"),
        "{config}"
    );
    publisher.stop().await;
    applier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_whose_port_another_process_holds_is_served_once_it_is_free() {
    let id = unique();
    let (nats, caddy) = tokio::join!(Nats::start(), Caddy::start());
    let (applier, board) = start_applier(&nats, &caddy, "taken");
    let publisher = start_publisher(&nats, &format!("t-{id}"), &id, "127.0.0.1");
    // Another process holds the site's port (Caddy runs on this host's
    // network, so it binds the same port).
    let port = free_port();
    let holder = std::net::TcpListener::bind(("0.0.0.0", port)).expect("hold the port");
    let site = format!("{id}.taken.test:{port}");
    let labels = web_labels(&site, &id);
    let backend = start_backend(&labels, "taken").await;
    let refusal = wait_for(
        "the container refused for its port",
        Duration::from_secs(30),
        || async {
            board
                .view()
                .rejected
                .into_iter()
                .find(|r| r.container.container_id == backend.id() && r.by == "caddy")
        },
    )
    .await;
    assert!(
        refusal.reason.contains("address already in use"),
        "{refusal:?}"
    );
    // Free: tried again with the same labels, and served.
    drop(holder);
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    wait_for(
        "the site served once its port is free",
        Duration::from_secs(60),
        || async {
            let response = client.get(&url).header("Host", &site).send().await.ok()?;
            let body = response.text().await.ok()?;
            (body == "taken").then_some(())
        },
    )
    .await;
    assert!(
        !board
            .view()
            .rejected
            .iter()
            .any(|r| r.container.container_id == backend.id()),
        "{:?}",
        board.view().rejected
    );
    publisher.stop().await;
    applier.stop().await;
}

/// Tokens that break naive quoting, marshalled by us and read by Caddy's
/// own `/adapt`: each stays one argument of its `respond` line, on the one
/// site that was written, so no label value can add a site or an option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_reads_back_exactly_the_tokens_we_marshal() {
    use caddy_fleet::schema::caddyfile::{Block, Caddyfile};
    let caddy = Caddy::start().await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let tokens = [
        "plain",
        "a b",
        "\"quoted\"",
        "x\" } evil.test { respond pwned #",
        "`back`tick",
        "a`\"b",
        "}",
        "{",
        "#not-a-comment",
        "<<EOF",
        "line\nbreak",
        "trailing\\",
        "\\#",
        "é ✓ unicode",
        "",
    ];
    for token in tokens {
        let file = Caddyfile {
            blocks: vec![Block::line(["http://adapt.test"])
                .with_child(Block::line(["respond", token, "200"]))],
        };
        let text = format!("{}{}", caddy.base_caddyfile(), file.marshal());
        let response = client
            .post(format!("{}/adapt", caddy.admin_url()))
            .header("Content-Type", "text/caddyfile")
            .body(text.clone())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let adapted: serde_json::Value = response.json().await.unwrap();
        assert!(status.is_success(), "{token:?}: {adapted}\n{text}");
        let servers = &adapted["result"]["apps"]["http"]["servers"];
        let routes: Vec<&serde_json::Value> = servers
            .as_object()
            .unwrap()
            .values()
            .flat_map(|s| s["routes"].as_array().unwrap())
            .collect();
        assert_eq!(routes.len(), 1, "{token:?} added routes: {adapted}\n{text}");
        assert_eq!(
            routes[0]["match"][0]["host"],
            serde_json::json!(["adapt.test"]),
            "{token:?}"
        );
        let handler = &routes[0]["handle"][0]["routes"][0]["handle"][0];
        assert_eq!(
            handler["handler"], "static_response",
            "{token:?}: {adapted}"
        );
        assert_eq!(
            handler["body"].as_str().unwrap_or(""),
            token,
            "{token:?}: {adapted}\n{text}"
        );
        assert_eq!(handler["status_code"], 200, "{token:?}: {adapted}");
    }
}
