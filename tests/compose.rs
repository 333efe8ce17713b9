//! Composed configs against Caddy's own `/adapt` of the whole Caddyfile,
//! on a real Caddy: every case of caddy-docker-proxy's golden corpus
//! (alone, under a base Caddyfile, and all together as one fleet),
//! property-generated multi-site configs, and a change of one site among
//! many (only that site is adapted again).
//!
//! `CADDY_FLEET_TEST_CADDY_ADMIN=http://127.0.0.1:PORT` uses a Caddy
//! already running there instead of starting one (for quick iterations).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use caddy_fleet::applier::caddy::{CaddyAdmin, CaddyApi, CaddyError};
use caddy_fleet::applier::compose::assemble::first_difference;
use caddy_fleet::applier::compose::{Composed, Composer};
use caddy_fleet::schema::caddyfile::Caddyfile;
use caddy_fleet::schema::labels::{from_labels, parse_golden_labels};
use caddy_fleet::schema::template::FixedTargets;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::value::RawValue;
use serde_json::Value;

/// A Caddy admin API that counts `/adapt` calls.
struct Counting {
    inner: CaddyAdmin,
    adapts: AtomicUsize,
}

impl CaddyApi for Counting {
    async fn adapt(&self, caddyfile: &str) -> Result<Value, CaddyError> {
        self.adapts.fetch_add(1, Ordering::SeqCst);
        self.inner.adapt(caddyfile).await
    }
    async fn running_admin(&self) -> Result<Option<Value>, CaddyError> {
        self.inner.running_admin().await
    }
    async fn has_id(&self, id: &str) -> Result<bool, CaddyError> {
        self.inner.has_id(id).await
    }
    async fn adapt_raw(&self, caddyfile: &str) -> Result<Box<RawValue>, CaddyError> {
        self.adapts.fetch_add(1, Ordering::SeqCst);
        self.inner.adapt_raw(caddyfile).await
    }
    async fn load(&self, config: &str) -> Result<(), CaddyError> {
        self.inner.load(config).await
    }
}

/// A real Caddy: the one named by the environment, or a container.
struct TestCaddy {
    api: Counting,
    _container: Option<support::Caddy>,
}

async fn caddy() -> TestCaddy {
    let (url, container) = match std::env::var("CADDY_FLEET_TEST_CADDY_ADMIN") {
        Ok(url) => (url, None),
        Err(_) => {
            let caddy = support::Caddy::start().await;
            (caddy.admin_url(), Some(caddy))
        }
    };
    TestCaddy {
        api: Counting {
            inner: CaddyAdmin::new(&url).unwrap(),
            adapts: AtomicUsize::new(0),
        },
        _container: container,
    }
}

/// How a composition compared with the whole adapt.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// Composed, and equal to the whole adapt.
    Equal,
    /// Caddy refuses the whole Caddyfile, and the composer gave no config.
    BothRefused,
    /// The composer asked for a whole adapt, for this reason.
    Fallback(String),
}

/// Composes `file` and adapts it whole; fails on any difference.
async fn check(
    caddy: &impl CaddyApi,
    composer: &mut Composer,
    file: &Caddyfile,
    name: &str,
) -> Verdict {
    let text = file.marshal();
    let whole = caddy.adapt(&text).await;
    let composed = composer
        .compose(caddy, file)
        .await
        .expect("Caddy reachable");
    match (whole, composed) {
        (Ok(whole), Composed::Config(config)) => {
            let config: Value = serde_json::from_str(config.get()).expect("composed JSON");
            if config != whole {
                let path =
                    first_difference(&whole, &config, &mut String::new()).unwrap_or_default();
                let at = |v: &Value| {
                    let pointer = path.replace('.', "/");
                    v.pointer(&pointer).cloned().unwrap_or(Value::Null)
                };
                panic!(
                    "{name}: composed config differs from Caddy's adapt at {path}\nCaddy:    {}\ncomposed: {}\nCaddy's TLS automation: {}\ncomposed TLS automation: {}\nCaddyfile:\n{text}",
                    at(&whole),
                    at(&config),
                    whole["apps"]["tls"]["automation"],
                    config["apps"]["tls"]["automation"]
                );
            }
            Verdict::Equal
        }
        (Ok(_), Composed::Whole(reason)) => Verdict::Fallback(reason.to_string()),
        (Err(CaddyError::Refused { message, .. }), Composed::Whole(_)) => {
            if std::env::var_os("COMPOSE_SHOW_REFUSALS").is_some() {
                println!("refused: {message}");
            }
            Verdict::BothRefused
        }
        (Err(CaddyError::Refused { message, .. }), Composed::Config(config)) => {
            panic!("{name}: Caddy refuses the whole Caddyfile ({message}) but it was composed to {config}\n{text}")
        }
        (Err(error), _) => panic!("{name}: {error}"),
    }
}

fn corpus_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schema/testdata")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    files
}

/// Every case of the golden corpus as the Caddyfile it translates to:
/// label files through the translation, merge files merged. Cases whose
/// translation fails (by design) have no Caddyfile.
fn corpus() -> Vec<(String, Option<Caddyfile>)> {
    let mut cases = Vec::new();
    for path in corpus_files("cdp/labels") {
        let text = std::fs::read_to_string(&path).unwrap();
        let labels: BTreeMap<String, String> = parse_golden_labels(&text);
        let file = from_labels(&labels, "caddy", &FixedTargets(vec!["target".into()])).ok();
        cases.push((
            format!("labels/{}", path.file_name().unwrap().to_string_lossy()),
            file,
        ));
    }
    for path in corpus_files("cdp/merge") {
        let text = std::fs::read_to_string(&path).unwrap();
        let parts: Vec<&str> = text.split("----------\n").collect();
        let mut file = Caddyfile::parse(parts[0]).unwrap();
        file.merge(Caddyfile::parse(parts[1]).unwrap());
        cases.push((
            format!("merge/{}", path.file_name().unwrap().to_string_lossy()),
            Some(file),
        ));
    }
    assert_eq!(cases.len(), 20, "the golden corpus has 20 cases");
    cases
}

/// The file with every site's hosts moved under `c<n>.`, so cases that
/// use the same names do not merge into one site when put together.
fn renamed(file: &Caddyfile, n: usize) -> Caddyfile {
    let mut file = file.clone();
    for block in &mut file.blocks {
        if block.is_global() || block.is_snippet() {
            continue;
        }
        for key in &mut block.keys {
            *key = match key.strip_prefix("*.") {
                Some(rest) => format!("*.c{n}.{rest}"),
                None => format!("c{n}.{key}"),
            };
        }
    }
    file
}

const BASE: &str = "{\n\thttp_port 8080\n\tauto_https off\n}\n";

fn with_base(file: &Caddyfile) -> Caddyfile {
    let mut base = Caddyfile::parse(BASE).unwrap();
    base.merge_all([file.clone()]);
    base
}

#[tokio::test]
async fn golden_corpus_composes_to_what_caddy_adapts() {
    support::ensure_images_unless_local();
    let caddy = caddy().await;
    let mut report = Vec::new();
    let mut fallbacks = Vec::new();
    let mut fleet = Vec::new();
    for (name, file) in corpus() {
        let Some(file) = file else {
            report.push(format!("{name}: the translation refuses it (no Caddyfile)"));
            continue;
        };
        let alone = check(&caddy.api, &mut Composer::new(), &file, &name).await;
        let based = check(&caddy.api, &mut Composer::new(), &with_base(&file), &name).await;
        for (context, verdict) in [("alone", &alone), ("under a base", &based)] {
            if let Verdict::Fallback(reason) = verdict {
                fallbacks.push(format!("{name} ({context}): {reason}"));
            }
        }
        if alone == Verdict::Equal {
            fleet.push(renamed(&file, fleet.len()));
        }
        report.push(format!("{name}: alone {alone:?}, under a base {based:?}"));
    }
    // The cases Caddy accepts, as fleets: their sites together (hosts
    // renamed apart), those that set TLS options and those that do not.
    let (with_tls, plain): (Vec<Caddyfile>, Vec<Caddyfile>) = fleet
        .into_iter()
        .partition(|f| f.marshal().contains("\ttls"));
    for (what, cases) in [
        ("without TLS options", plain),
        ("with TLS options", with_tls),
    ] {
        let mut all = Caddyfile::parse(BASE).unwrap();
        let n = cases.len();
        all.merge_all(cases);
        let together = check(&caddy.api, &mut Composer::new(), &all, what).await;
        report.push(format!(
            "the cases {what} together ({n} cases): {together:?}"
        ));
        assert_eq!(together, Verdict::Equal, "{what}");
    }
    println!("golden corpus:\n  {}", report.join("\n  "));
    println!("fallbacks ({}): {fallbacks:?}", fallbacks.len());
    // At most 5 % of the corpus's 20 cases may need a whole adapt.
    let cases: std::collections::BTreeSet<&str> = fallbacks
        .iter()
        .filter_map(|f| f.split(' ').next())
        .collect();
    println!(
        "corpus cases that fall back: {} of 20 ({:.0} %): {cases:?}",
        cases.len(),
        cases.len() as f64 * 5.0
    );
    assert!(
        cases.len() * 100 <= 5 * 20,
        "too many fallbacks: {fallbacks:?}"
    );
}

/// A site of a generated config.
#[derive(Debug, Clone)]
struct SiteSpec {
    keys: Vec<String>,
    directives: Vec<String>,
}

/// A site's addresses: one or two names in one shape (as labels write
/// them), now and then a second shape.
fn site_keys() -> impl Strategy<Value = Vec<String>> {
    let name = prop::sample::select(vec![
        "a",
        "b",
        "shop",
        "api",
        "www",
        "x1",
        "long-name",
        "m",
        "docs",
        "img",
        "eu",
        "us",
    ]);
    let domain = prop::sample::select(vec!["test", "example.com", "localhost"]);
    let shape = |shape: u8, name: &str, domain: &str| match shape {
        0 => format!("http://{name}.{domain}"),
        1 => format!("*.{name}.{domain}"),
        2 => format!("{name}.{domain}:8443"),
        3 => format!("https://{name}.{domain}"),
        _ => format!("{name}.{domain}"),
    };
    (
        prop::collection::vec((name, domain), 1..3),
        0..7u8,
        prop::option::weighted(0.1, (0..7u8, "[a-z]{3}")),
    )
        .prop_map(move |(names, s, extra)| {
            let mut keys: Vec<String> = names.iter().map(|(n, d)| shape(s, n, d)).collect();
            if let Some((s2, n)) = extra {
                keys.push(shape(s2, &n, "test"));
            }
            keys.dedup();
            keys
        })
}

fn directive() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "reverse_proxy up1:80",
        "reverse_proxy up1:80 up2:8080",
        "respond \"hello\" 200",
        "handle /a {\n\t\trespond a\n\t}",
        "handle /b/* {\n\t\treverse_proxy up3:80\n\t}",
        "handle {\n\t\trespond fallback\n\t}",
        "handle_path /p/* {\n\t\trewrite * /q{uri}\n\t\treverse_proxy up4:80\n\t}",
        "rewrite /old /new",
        "root * /srv",
        "root /static/* /srv/static",
        "encode gzip",
        "header X-Fleet yes",
        "redir /go https://example.com/",
        "@api path /api/*\n\treverse_proxy @api up5:80",
        "route /r {\n\t\theader X-R 1\n\t\trespond r\n\t}",
        "uri strip_prefix /x",
        "file_server",
    ])
    .prop_map(str::to_string)
}

fn site() -> impl Strategy<Value = SiteSpec> {
    (site_keys(), prop::collection::vec(directive(), 1..5))
        .prop_map(|(keys, directives)| SiteSpec { keys, directives })
}

fn globals() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "",
        BASE,
        "{\n\temail ops@example.com\n}\n",
        "{\n\tauto_https disable_redirects\n}\n",
        "{\n\thttp_port 8080\n\thttps_port 8443\n}\n",
        "{\n\tdefault_sni a.test\n}\n",
    ])
}

fn config_text(globals: &str, sites: &[SiteSpec]) -> String {
    let mut text = globals.to_string();
    for site in sites {
        text.push_str(&site.keys.join(", "));
        text.push_str(" {\n");
        for d in &site.directives {
            text.push('\t');
            text.push_str(d);
            text.push('\n');
        }
        text.push_str("}\n");
    }
    text
}

#[test]
fn generated_configs_compose_to_what_caddy_adapts() {
    support::ensure_images_unless_local();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let caddy = runtime.block_on(caddy());
    // A fixed seed: the same 64 configs every run.
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 64,
            failure_persistence: None,
            ..Config::default()
        },
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let verdicts = std::sync::Mutex::new(Vec::new());
    // Now and then every site sets TLS options (`tls internal`): their
    // automation policies are then combined across sites.
    let strategy = (
        globals(),
        prop::collection::vec(site(), 1..7),
        prop::bool::weighted(0.25),
    );
    let result = runner.run(&strategy, |(globals, mut sites, all_tls)| {
        if all_tls {
            for site in &mut sites {
                site.directives.push("tls internal".into());
            }
        }
        let text = config_text(globals, &sites);
        let file = Caddyfile::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(check(&caddy.api, &mut Composer::new(), &file, "generated"))
        }))
        .map_err(|e| {
            TestCaseError::fail(
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            )
        })?;
        verdicts.lock().unwrap().push(verdict);
        Ok(())
    });
    // The Caddy container stops inside the runtime.
    runtime.block_on(async move { drop(caddy) });
    let verdicts = verdicts.into_inner().unwrap();
    let count = |f: fn(&Verdict) -> bool| verdicts.iter().filter(|v| f(v)).count();
    println!(
        "generated configs: {} composed equal, {} refused by Caddy whole (and not composed), {} fell back",
        count(|v| *v == Verdict::Equal),
        count(|v| *v == Verdict::BothRefused),
        count(|v| matches!(v, Verdict::Fallback(_)))
    );
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for v in &verdicts {
        if let Verdict::Fallback(reason) = v {
            if std::env::var_os("COMPOSE_SHOW_REFUSALS").is_some() {
                println!("fallback: {reason}");
            }
            *reasons
                .entry(reason.split(':').next().unwrap_or("").to_string())
                .or_default() += 1;
        }
    }
    println!("fallback reasons: {reasons:?}");
    if let Err(error) = result {
        panic!("{error}");
    }
    assert!(
        count(|v| *v == Verdict::Equal) >= 32,
        "too few generated configs were composed: {verdicts:?}"
    );
}

#[tokio::test]
async fn changing_one_site_among_many_adapts_only_that_site() {
    support::ensure_images_unless_local();
    let caddy = caddy().await;
    let site = |i: usize, body: &str| {
        format!(
            "site{i}.test {{\n\treverse_proxy up{i}:80\n\thandle /x {{\n\t\trespond {body}\n\t}}\n\thandle {{\n\t\trespond other\n\t}}\n}}\n"
        )
    };
    let config = |changed: Option<&str>| {
        let mut text = BASE.to_string();
        for i in 0..50 {
            let body = if i == 17 { changed.unwrap_or("x") } else { "x" };
            text.push_str(&site(i, body));
        }
        Caddyfile::parse(&text).unwrap()
    };
    let mut composer = Composer::new();
    let before = caddy.api.adapts.load(Ordering::SeqCst);
    // Cold: more sites than a push adapts alone, so the first push is
    // adapted whole and the sites are adapted between pushes.
    let first = composer.compose(&caddy.api, &config(None)).await.unwrap();
    assert!(
        matches!(first, Composed::Whole(ref r) if r.kind == "cold"),
        "{first:?}"
    );
    while composer.wants_warming() {
        composer.warm(&caddy.api).await.unwrap();
    }
    let warmed = caddy.api.adapts.load(Ordering::SeqCst) - before;
    // The global options with the probe, and each of the 50 sites.
    assert_eq!(warmed, 51);
    assert_eq!(
        check(&caddy.api, &mut composer, &config(None), "50 sites").await,
        Verdict::Equal
    );
    let before = caddy.api.adapts.load(Ordering::SeqCst);
    let verdict = check(
        &caddy.api,
        &mut composer,
        &config(Some("changed")),
        "one changed",
    )
    .await;
    assert_eq!(verdict, Verdict::Equal);
    // One whole adapt by `check` for the comparison, one for the site.
    assert_eq!(caddy.api.adapts.load(Ordering::SeqCst) - before, 2);
    // A new site among them: again only that site.
    let mut bigger = config(Some("changed"));
    bigger.merge_all([Caddyfile::parse(&site(50, "new")).unwrap()]);
    let before = caddy.api.adapts.load(Ordering::SeqCst);
    assert_eq!(
        check(&caddy.api, &mut composer, &bigger, "one added").await,
        Verdict::Equal
    );
    assert_eq!(caddy.api.adapts.load(Ordering::SeqCst) - before, 2);

    // Beyond the limit for whole adapts, a cold config is composed from
    // its sites adapted alone at once, and equals Caddy's whole adapt.
    let mut composer = Composer::with_whole_adapt_limit(10);
    let before = caddy.api.adapts.load(Ordering::SeqCst);
    assert_eq!(
        check(&caddy.api, &mut composer, &bigger, "cold, beyond the limit").await,
        Verdict::Equal
    );
    // One whole adapt by `check`, the global options with the probe, and
    // each of the 51 sites.
    assert_eq!(caddy.api.adapts.load(Ordering::SeqCst) - before, 53);
    assert!(!composer.wants_warming());
}

/// `COMPOSE_FILE=path`: composes that Caddyfile and compares (debugging).
#[tokio::test]
async fn compose_one_file_from_the_environment() {
    let Ok(path) = std::env::var("COMPOSE_FILE") else {
        return;
    };
    let caddy = caddy().await;
    let file = Caddyfile::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let verdict = check(&caddy.api, &mut Composer::new(), &file, "file").await;
    println!("{verdict:?}");
}

/// What composition does not reproduce is adapted whole, with its reason.
#[tokio::test]
async fn shapes_not_composed_fall_back_with_their_reason() {
    support::ensure_images_unless_local();
    let caddy = caddy().await;
    for (text, kind) in [
        (
            "a.test {\n\tlog\n\trespond a\n}\nb.test {\n\trespond b\n}\n",
            "access-log",
        ),
        (
            "a.test {\n\ttls internal\n}\nb.test {\n\trespond b\n}\n",
            "tls-automation-mixed",
        ),
        (
            "a.test, a.test:8443 {\n\trespond a\n}\n",
            "several-listeners",
        ),
        (
            "a.test {\n\thandle_errors {\n\t\trespond oops\n\t}\n}\n",
            "handle-errors",
        ),
    ] {
        let file = Caddyfile::parse(text).unwrap();
        let verdict = check(&caddy.api, &mut Composer::new(), &file, text).await;
        match verdict {
            Verdict::Fallback(reason) => assert!(reason.starts_with(kind), "{text}: {reason}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}
