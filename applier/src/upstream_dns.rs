//! The applier's DNS server for dynamic upstreams (`UPSTREAMS=dynamic`):
//! Caddy's `dynamic srv` upstreams ask it, at request time, where each
//! generated handler's upstreams are now.
//!
//! What it answers is computed from the folded state by the convergence
//! task ([`UpstreamAnswers::of_units`], published through
//! [`AnswerBoard::publish`]) and nothing else: the SRV answer for a name is
//! the union of the upstreams of the accepted containers whose handler
//! carries that name, which are exactly the upstreams the static config
//! would have listed, after the policy's checks; containers not running,
//! being stopped or reported unhealthy by Docker are not routable and so
//! never in an answer. Targets are host names spelling their address
//! ([`caddy_fleet_schema::dynamic::target_name`]); their A/AAAA answers
//! are read off the name, so an answer Caddy cached keeps resolving.
//!
//! The server (hickory-server) listens on UDP and TCP at
//! `UPSTREAM_DNS_LISTEN` (loopback next to Caddy), is authoritative for
//! [`ZONE`] only and refuses every other name: it is no recursive
//! resolver. A query never waits on anything: answers are read from the
//! latest published zone.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use caddy_fleet_schema::dynamic::{target_address, target_name, ZONE};
use caddy_fleet_schema::translate::ContainerUnit;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;

use crate::telemetry::Answer;

/// How long an idle TCP connection from Caddy is kept.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Each dynamic name and the upstreams it answers with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamAnswers {
    names: BTreeMap<String, BTreeSet<SocketAddr>>,
}

impl UpstreamAnswers {
    /// The answers for `units` (the containers in the config).
    pub fn of_units<'a>(units: impl IntoIterator<Item = &'a ContainerUnit>) -> Self {
        let mut names: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
        for unit in units {
            for proxy in &unit.proxies.dynamic {
                let upstreams = names.entry(proxy.name.to_ascii_lowercase()).or_default();
                upstreams.extend(
                    proxy
                        .upstreams
                        .iter()
                        .filter_map(|u| u.parse::<SocketAddr>().ok()),
                );
            }
        }
        UpstreamAnswers { names }
    }

    /// How many names there are.
    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// How many upstreams all the names hold.
    pub fn upstreams(&self) -> usize {
        self.names.values().map(BTreeSet::len).sum()
    }

    /// The upstreams answered for `name`.
    pub fn of(&self, name: &str) -> Option<&BTreeSet<SocketAddr>> {
        self.names.get(&name.to_ascii_lowercase())
    }
}

/// The answers in force, as the server reads them. Records are built
/// per query: kept built, they took three times the answers' memory at
/// 10,000 names, and Caddy asks for a name once per refresh.
#[derive(Debug, Default)]
struct Zone {
    answers: UpstreamAnswers,
    /// The TTL of SRV records.
    ttl: u32,
}

impl Zone {
    /// The SRV records answering `name` (lowercase, fully qualified).
    fn srv(&self, name: &LowerName) -> Option<Vec<Record>> {
        let text = name.to_string();
        let upstreams = match text.ends_with('.') {
            true => self.answers.names.get(&text),
            false => self.answers.names.get(&format!("{text}.")),
        }?;
        let owner = Name::from(name.clone());
        Some(
            upstreams
                .iter()
                .filter_map(|upstream| {
                    let target = Name::from_ascii(target_name(upstream.ip())).ok()?;
                    Some(Record::from_rdata(
                        owner.clone(),
                        self.ttl,
                        RData::SRV(SRV::new(10, 10, upstream.port(), target)),
                    ))
                })
                .collect(),
        )
    }
}

/// Where the convergence task publishes answers; cheap to clone.
#[derive(Debug, Clone)]
pub struct AnswerBoard {
    zone: watch::Sender<Arc<Zone>>,
    ttl: u32,
}

impl AnswerBoard {
    /// An empty board whose records carry `ttl` (Caddy's refresh: it
    /// caches by its own `refresh`, the TTL only tells other readers).
    pub fn new(ttl: Duration) -> Self {
        let ttl = ttl.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
        AnswerBoard {
            zone: watch::Sender::new(Arc::new(Zone::default())),
            ttl,
        }
    }

    /// Serves `answers` from now on; returns whether they differ from the
    /// ones in force.
    pub fn publish(&self, answers: UpstreamAnswers) -> bool {
        if self.zone.borrow().answers == answers {
            return false;
        }
        self.zone.send_replace(Arc::new(Zone {
            answers,
            ttl: self.ttl,
        }));
        true
    }

    /// The answers in force.
    pub fn current(&self) -> UpstreamAnswers {
        self.zone.borrow().answers.clone()
    }
}

/// Why the DNS server could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot listen for DNS on {address} ({protocol}): {source}; set UPSTREAM_DNS_LISTEN to a free loopback address next to Caddy")]
    Bind {
        address: SocketAddr,
        protocol: &'static str,
        source: std::io::Error,
    },
}

/// How many ports `UpstreamDns::bind` picks at most for an address with
/// port 0.
const ANY_PORT_PICKS: u32 = 64;

/// The server, bound and not yet serving.
pub struct UpstreamDns {
    server: Server<Handler>,
    local: SocketAddr,
}

impl UpstreamDns {
    /// Binds UDP and TCP at `listen` (port 0: any free port, the same for
    /// both), answering from `board`; `queries` counts each answer.
    pub async fn bind(
        listen: SocketAddr,
        board: &AnswerBoard,
        queries: Family<Answer, Counter>,
    ) -> Result<Self, DnsError> {
        let bind_error = |protocol| {
            move |source| DnsError::Bind {
                address: listen,
                protocol,
                source,
            }
        };
        // With port 0 the UDP port is the system's pick, and a TCP socket
        // may hold the same number (a busy host has thousands of
        // connections in that range): pick again.
        let mut picks = if listen.port() == 0 {
            ANY_PORT_PICKS
        } else {
            1
        };
        let (udp, local, tcp) = loop {
            picks -= 1;
            let udp = tokio::net::UdpSocket::bind(listen)
                .await
                .map_err(bind_error("udp"))?;
            let local = udp.local_addr().map_err(bind_error("udp"))?;
            match tokio::net::TcpListener::bind(local).await {
                Ok(tcp) => break (udp, local, tcp),
                Err(error) if error.kind() == std::io::ErrorKind::AddrInUse && picks > 0 => {
                    tracing::debug!(
                        port = local.port(),
                        "The port picked for UDP is taken for TCP; picking another."
                    );
                }
                Err(error) => return Err(bind_error("tcp")(error)),
            }
        };
        let mut server = Server::new(Handler {
            zone: board.zone.subscribe(),
            queries,
        });
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, 64);
        Ok(UpstreamDns { server, local })
    }

    /// The address it answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Answers until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            // Stopping: stop answering (Caddy keeps its cached answers).
            () = shutdown => {}
            // The server's tasks ended by themselves (a socket failed).
            result = self.server.block_until_done() => {
                if let Err(error) = result {
                    tracing::error!(%error, "The upstream DNS server stopped; Caddy keeps its last answers, asking again every UPSTREAM_DNS_GRACE.");
                }
                return;
            }
        }
        if let Err(error) = self.server.shutdown_gracefully().await {
            tracing::debug!(%error, "The upstream DNS server did not stop cleanly.");
        }
    }
}

/// Answers queries from the latest zone.
struct Handler {
    zone: watch::Receiver<Arc<Zone>>,
    queries: Family<Answer, Counter>,
}

/// What a query is answered with.
enum Reply {
    Records {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    /// A name under [`ZONE`] that does not exist.
    NoSuchName,
    /// A name outside [`ZONE`]: not ours to answer.
    Refused,
}

impl Handler {
    fn reply(&self, name: &LowerName, kind: RecordType) -> Reply {
        let text = name.to_string();
        if !in_zone(&text) {
            return Reply::Refused;
        }
        let ttl = 1;
        if let Some(address) = target_address(&text) {
            let rdata = match (kind, address) {
                (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => Some(RData::A(A(v4))),
                (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA(v6))),
                _ => None,
            };
            return Reply::Records {
                answers: rdata
                    .map(|rdata| Record::from_rdata(Name::from(name.clone()), ttl, rdata))
                    .into_iter()
                    .collect(),
                additionals: Vec::new(),
            };
        }
        let Some(records) = self.zone.borrow().srv(name) else {
            return Reply::NoSuchName;
        };
        if !matches!(kind, RecordType::SRV | RecordType::ANY) {
            return Reply::Records {
                answers: Vec::new(),
                additionals: Vec::new(),
            };
        }
        let additionals = records
            .iter()
            .filter_map(|record| match &record.data {
                RData::SRV(srv) => {
                    let address = target_address(&srv.target.to_string())?;
                    let rdata = match address {
                        IpAddr::V4(v4) => RData::A(A(v4)),
                        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                    };
                    Some(Record::from_rdata(srv.target.clone(), ttl, rdata))
                }
                _ => None,
            })
            .collect();
        Reply::Records {
            answers: records,
            additionals,
        }
    }

    fn count(&self, answer: &'static str) {
        self.queries
            .get_or_create(&Answer {
                answer: answer.to_string(),
            })
            .inc();
    }
}

fn in_zone(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let zone = ZONE.trim_end_matches('.');
    let name = name.trim_end_matches('.');
    name == zone || name.ends_with(&format!(".{zone}"))
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut edns_out = Edns::new();
        let edns = request.edns.as_ref().map(|edns| {
            edns_out.set_max_payload(edns.max_payload().max(512));
            &edns_out
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = edns {
            builder.edns(edns);
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let query = match request.request_info() {
            Ok(info)
                if request.metadata.message_type == MessageType::Query
                    && request.metadata.op_code == OpCode::Query =>
            {
                info.query
            }
            _ => {
                self.count("malformed");
                metadata.response_code = ResponseCode::FormErr;
                return send(
                    response
                        .send_response(builder.build_no_records(metadata))
                        .await,
                );
            }
        };
        let (answer, reply) = match self.reply(query.name(), query.query_type()) {
            Reply::Records {
                answers,
                additionals,
            } => (
                if answers.is_empty() {
                    "empty"
                } else {
                    "answered"
                },
                (ResponseCode::NoError, answers, additionals),
            ),
            Reply::NoSuchName => ("no_such_name", (ResponseCode::NXDomain, vec![], vec![])),
            Reply::Refused => ("refused", (ResponseCode::Refused, vec![], vec![])),
        };
        self.count(answer);
        let (code, answers, additionals) = reply;
        metadata.response_code = code;
        let message = builder.build(metadata, answers.iter(), None, None, additionals.iter());
        send(response.send_response(message).await)
    }
}

/// What was sent, or a SERVFAIL header when sending failed.
fn send(sent: Result<ResponseInfo, hickory_server::net::NetError>) -> ResponseInfo {
    match sent {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(%error, "Could not send a DNS answer.");
            let mut metadata = Metadata::new(0, MessageType::Response, OpCode::Query);
            metadata.response_code = ResponseCode::ServFail;
            hickory_server::proto::op::Header {
                metadata,
                counts: Default::default(),
            }
            .into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caddy_fleet_schema::dynamic::{DynamicProxy, ProxyModes};
    use caddy_fleet_schema::AgentId;
    use hickory_server::proto::op::{Message, Query};

    fn unit(id: &str, name: &str, upstreams: &[&str]) -> ContainerUnit {
        ContainerUnit {
            agent: AgentId::new("a1").unwrap(),
            container: id.into(),
            container_id: id.into(),
            file: Default::default(),
            text: "".into(),
            spans: Default::default(),
            trusted: true,
            proxies: std::sync::Arc::new(ProxyModes {
                dynamic: vec![DynamicProxy {
                    site: "a.test".into(),
                    name: name.into(),
                    upstreams: upstreams.iter().map(|u| u.to_string()).collect(),
                }],
                kept_static: Vec::new(),
            }),
        }
    }

    /// One query over UDP, as Caddy's Go resolver sends it.
    async fn ask(server: SocketAddr, name: &str, kind: RecordType) -> Message {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        socket
            .send_to(&query.to_vec().unwrap(), server)
            .await
            .unwrap();
        let mut buffer = vec![0; 4096];
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buffer))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        Message::from_vec(&buffer[..len]).unwrap()
    }

    #[tokio::test]
    async fn answers_srv_from_the_published_units_and_addresses_from_target_names() {
        let board = AnswerBoard::new(Duration::from_secs(1));
        let name = "h0123-a-test.caddy-fleet.internal.";
        let units = [
            unit("c1", name, &["10.0.0.7:8001"]),
            unit("c2", name, &["10.0.0.8:8002", "[fd00::9]:8003"]),
        ];
        assert!(board.publish(UpstreamAnswers::of_units(&units)));
        assert!(
            !board.publish(UpstreamAnswers::of_units(&units)),
            "the same answers are no change"
        );
        let server = UpstreamDns::bind("127.0.0.1:0".parse().unwrap(), &board, Family::default())
            .await
            .unwrap();
        let address = server.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));

        let srv = ask(address, name, RecordType::SRV).await;
        assert_eq!(srv.metadata.response_code, ResponseCode::NoError);
        assert!(srv.metadata.authoritative);
        let mut targets: Vec<(String, u16)> = srv
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some((srv.target.to_string(), srv.port)),
                _ => None,
            })
            .collect();
        targets.sort();
        assert_eq!(
            targets,
            [
                ("ip4-10-0-0-7.caddy-fleet.internal.".to_string(), 8001),
                ("ip4-10-0-0-8.caddy-fleet.internal.".to_string(), 8002),
                (target_name("fd00::9".parse().unwrap()), 8003),
            ]
        );
        assert_eq!(srv.additionals.len(), 3, "addresses come along");

        let a = ask(address, "ip4-10-0-0-7.caddy-fleet.internal.", RecordType::A).await;
        assert!(
            matches!(&a.answers[0].data, RData::A(a) if a.0 == std::net::Ipv4Addr::new(10, 0, 0, 7))
        );
        let aaaa = ask(
            address,
            &target_name("fd00::9".parse().unwrap()),
            RecordType::AAAA,
        )
        .await;
        assert!(matches!(&aaaa.answers[0].data, RData::AAAA(_)));
        let wrong_family = ask(
            address,
            "ip4-10-0-0-7.caddy-fleet.internal.",
            RecordType::AAAA,
        )
        .await;
        assert_eq!(wrong_family.metadata.response_code, ResponseCode::NoError);
        assert!(wrong_family.answers.is_empty());

        let unknown = ask(
            address,
            "h9999-b-test.caddy-fleet.internal.",
            RecordType::SRV,
        )
        .await;
        assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
        let outside = ask(address, "example.com.", RecordType::A).await;
        assert_eq!(outside.metadata.response_code, ResponseCode::Refused);

        // A deploy: the answers change and the next query sees them.
        assert!(board.publish(UpstreamAnswers::of_units(&[unit(
            "c3",
            name,
            &["10.0.0.9:9000"]
        )])));
        let moved = ask(address, name, RecordType::SRV).await;
        assert_eq!(moved.answers.len(), 1);
        assert!(matches!(&moved.answers[0].data, RData::SRV(srv) if srv.port == 9000));

        let _ = stop.send(());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_taken_address_is_a_clear_error() {
        let board = AnswerBoard::new(Duration::from_secs(1));
        let first = UpstreamDns::bind("127.0.0.1:0".parse().unwrap(), &board, Family::default())
            .await
            .unwrap();
        let error = UpstreamDns::bind(first.local_addr(), &board, Family::default())
            .await
            .err()
            .expect("the address is taken");
        let text = error.to_string();
        assert!(text.contains("UPSTREAM_DNS_LISTEN"), "{text}");
        assert!(text.contains(&first.local_addr().to_string()), "{text}");
    }
}
