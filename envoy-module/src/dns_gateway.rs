//! The `dns_gateway` UDP listener filter.
//!
//! For each datagram:
//! - a response (QR set): counted as `responses_dropped` and **dropped**,
//!   never answered and never passed on (no reply-to-reply loops);
//! - shorter than a DNS header: counted as `malformed` and dropped;
//! - an opcode other than QUERY: a header-only **NOTIMP** (`notimp`);
//! - zero or several questions, or an unparseable message: a header-only
//!   **FORMERR** (`formerr`);
//! - a class other than IN, or a name no pattern matches: counted as
//!   `passed_on` and handed to the next UDP listener filter (`Continue`;
//!   the seed puts Envoy's `dns_filter` there as the fallback resolver);
//! - a matched name asked for A (or ANY): the name's VIP in an
//!   authoritative answer (`answered`; `allocations` when the VIP is new);
//!   **SERVFAIL** when the pool is exhausted (`exhausted`), when the cap on
//!   new VIPs per second is reached (`rate_limited`; names that already
//!   have a VIP are still answered), or when the VIP cannot be recorded in
//!   the pinned map (`store_errors`);
//! - a matched name asked for any other type: NOERROR/NODATA with the
//!   zone's SOA (`nodata`).
//!
//! A panic while handling a datagram drops that datagram (`panics`): the
//! filter fails closed rather than passing a half-handled query on.

use std::sync::Arc;

use hickory_proto::{op::ResponseCode, rr::RecordType};

use crate::{
    allocator::AllocError,
    api::{
        log, CounterKind, Counters, LogLevel, UdpFilterHandle, UdpListenerFilter,
        UdpListenerFilterConfig, UdpStatus,
    },
    config::DnsGatewaySettings,
    dns::{self, Inspection},
    state::GatewayState,
};

/// Counters of `dns_gateway`, visible on Envoy's `/stats` as
/// `dynamicmodulescustom.dns_gateway.<name>` (Envoy scopes UDP listener
/// filter stats by filter name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsCounter {
    /// Datagrams seen.
    Queries,
    /// A answers sent.
    Answered,
    /// NODATA answers sent.
    Nodata,
    /// Datagrams handed to the next filter.
    PassedOn,
    /// Datagrams dropped as unparseable.
    Malformed,
    /// New VIPs allocated.
    Allocations,
    /// Queries answered SERVFAIL because the pool was exhausted.
    Exhausted,
    /// Allocations that could not be written to the pinned VIP map.
    StoreErrors,
    /// Answers that could not be built or sent.
    SendErrors,
    /// VIPs taken over from an idle name for a new one (pool full).
    Reclaimed,
    /// Responses (QR set) dropped unanswered.
    ResponsesDropped,
    /// NOTIMP answers to opcodes other than QUERY.
    Notimp,
    /// FORMERR answers to queries that are not one well-formed question.
    Formerr,
    /// SERVFAIL answers because the cap on new VIPs per second was reached.
    RateLimited,
    /// Datagrams dropped because handling them panicked.
    Panics,
    /// DNS-over-TCP connections closed past their query limit.
    TcpQueryLimit,
}

impl CounterKind for DnsCounter {
    const ALL: &'static [Self] = &[
        Self::Queries,
        Self::Answered,
        Self::Nodata,
        Self::PassedOn,
        Self::Malformed,
        Self::Allocations,
        Self::Exhausted,
        Self::StoreErrors,
        Self::SendErrors,
        Self::Reclaimed,
        Self::ResponsesDropped,
        Self::Notimp,
        Self::Formerr,
        Self::RateLimited,
        Self::Panics,
        Self::TcpQueryLimit,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Queries => "queries",
            Self::Answered => "answered",
            Self::Nodata => "nodata",
            Self::PassedOn => "passed_on",
            Self::Malformed => "malformed",
            Self::Allocations => "allocations",
            Self::Exhausted => "exhausted",
            Self::StoreErrors => "store_errors",
            Self::SendErrors => "send_errors",
            Self::Reclaimed => "reclaimed",
            Self::ResponsesDropped => "responses_dropped",
            Self::Notimp => "notimp",
            Self::Formerr => "formerr",
            Self::RateLimited => "rate_limited",
            Self::Panics => "panics",
            Self::TcpQueryLimit => "tcp_query_limit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The configuration and state one `dns_gateway` (UDP) or
/// `dns_gateway_tcp` filter config shares with its filters.
pub(crate) struct Shared {
    pub(crate) settings: DnsGatewaySettings,
    pub(crate) state: Arc<GatewayState>,
    pub(crate) counters: Counters<DnsCounter>,
}

/// A loaded `dns_gateway` config, shared by the filters of all workers.
pub struct DnsGatewayConfig {
    shared: Arc<Shared>,
}

impl DnsGatewayConfig {
    /// Builds the config and registers its patterns with its gateway's
    /// `state` (reloading the VIP table from the pinned map, if any). Fails
    /// when the pinned maps are required and missing.
    pub fn new(
        settings: DnsGatewaySettings,
        state: Arc<GatewayState>,
        counters: Counters<DnsCounter>,
    ) -> Result<Self, String> {
        let summary = state.register(
            Arc::new(settings.patterns.clone()),
            settings.require_pinned_maps,
        )?;
        if let (Some(file), Some(version)) = (&settings.domains_file, settings.domains_version) {
            let ack = settings
                .domains_ack
                .clone()
                .unwrap_or_else(|| crate::reload::ack_path(file));
            crate::reload::watch(file, &ack, version, &state);
        }
        state.set_vip6_prefix(settings.vip6_prefix);
        crate::log_fmt!(
            LogLevel::Info,
            "dns_gateway: {} domain patterns, VIPs from {}/{} (at most {}), TTL {} s; {summary}",
            settings.patterns.rules().len(),
            settings.pool.network(),
            settings.pool.prefix_len(),
            settings.pool.max_entries(),
            settings.ttl
        );
        Ok(Self {
            shared: Arc::new(Shared {
                settings,
                state,
                counters,
            }),
        })
    }
}

impl DnsGatewayConfig {
    /// The shared part, for the DNS-over-TCP filter built on the same
    /// settings.
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }
}

/// The IPv6 VIP of a name: the /96 prefix followed by its IPv4 VIP.
pub fn ipv6_vip(prefix: std::net::Ipv6Addr, vip: std::net::Ipv4Addr) -> std::net::Ipv6Addr {
    let mut octets = prefix.octets();
    octets[12..].copy_from_slice(&vip.octets());
    std::net::Ipv6Addr::from(octets)
}

impl UdpListenerFilterConfig for DnsGatewayConfig {
    fn new_filter(&self) -> Box<dyn UdpListenerFilter> {
        Box::new(DnsGatewayFilter {
            shared: self.shared.clone(),
        })
    }
}

/// The filter of one worker.
pub struct DnsGatewayFilter {
    shared: Arc<Shared>,
}

/// What becomes of one DNS message.
pub(crate) enum Outcome {
    Reply(Vec<u8>),
    PassOn,
    Drop,
}

impl DnsGatewayFilter {
    fn count(&self, handle: &mut dyn UdpFilterHandle, counter: DnsCounter) {
        if let Some(id) = self.shared.counters.id(counter) {
            handle.increment_counter(id, 1);
        }
    }
}

impl Shared {
    /// Counts (and logs) a successful allocation: a reclaimed or new VIP,
    /// and the answer.
    fn note_allocated(
        &self,
        allocated: &crate::allocator::Allocated,
        name: &str,
        rule: &crate::matcher::DomainRule,
        count: &mut dyn FnMut(DnsCounter),
    ) {
        if let Some(previous) = &allocated.reclaimed_from {
            count(DnsCounter::Reclaimed);
            crate::log_fmt!(
                LogLevel::Info,
                "dns_gateway: pool full; VIP {} reclaimed from idle {previous} for {name}",
                allocated.vip
            );
        }
        if allocated.new {
            count(DnsCounter::Allocations);
            crate::log_fmt!(
                LogLevel::Debug,
                "dns_gateway: {name} -> {} (new, pattern {})",
                allocated.vip,
                rule.pattern
            );
        }
        count(DnsCounter::Answered);
    }

    /// The answer when no VIP could be had: SERVFAIL, or `None` to pass
    /// the query on (`on_exhausted: pass`).
    fn allocation_failed(
        &self,
        query: &dns::Query,
        name: &str,
        error: AllocError,
        count: &mut dyn FnMut(DnsCounter),
    ) -> Option<Result<Vec<u8>, String>> {
        let settings = &self.settings;
        match error {
            AllocError::Store(e) => {
                count(DnsCounter::StoreErrors);
                crate::log_fmt!(LogLevel::Warn, "dns_gateway: cannot record a VIP for {name} in the shared VIP map: {e}; SERVFAIL");
            }
            AllocError::RateLimited => {
                count(DnsCounter::RateLimited);
                crate::log_fmt!(
                    LogLevel::Debug,
                    "dns_gateway: new-VIP rate cap reached: SERVFAIL for {name}"
                );
            }
            AllocError::Exhausted => {
                count(DnsCounter::Exhausted);
                let pass = settings.pass_on_exhausted;
                crate::log_fmt!(
                    LogLevel::Warn,
                    "dns_gateway: VIP pool {}/{} exhausted ({} VIPs): {} for {name}",
                    settings.pool.network(),
                    settings.pool.prefix_len(),
                    settings.pool.max_entries(),
                    if pass {
                        "passing the query on"
                    } else {
                        "SERVFAIL"
                    }
                );
                if pass {
                    return None;
                }
            }
        }
        Some(dns::error_answer(query, ResponseCode::ServFail))
    }

    /// The fast path (see [`crate::dns_fast`]): a plain A/AAAA query for a
    /// matched name, answered from the wire. `None` before anything
    /// happened when the general path must decide; once a VIP was asked
    /// for, the outcome is final.
    fn decide_fast(
        &self,
        patterns: &crate::matcher::PatternSet,
        message: &[u8],
        udp: bool,
        count: &mut dyn FnMut(DnsCounter),
    ) -> Option<Outcome> {
        let settings = &self.settings;
        if settings.debug_panic_on_domain.is_some() {
            return None;
        }
        let fast = crate::dns_fast::parse(message)?;
        let Some(rule) = patterns.best_match(&fast.name) else {
            // What the general path would decide for a plain IN query of
            // no configured name, without parsing it a second time.
            count(DnsCounter::PassedOn);
            return Some(Outcome::PassOn);
        };
        let aaaa = fast.qtype == u16::from(RecordType::AAAA);
        if aaaa && settings.vip6_prefix.is_none() {
            return None;
        }
        let name = fast.name.as_str();
        let allocated =
            match self
                .state
                .allocate(name, &settings.pool, settings.require_pinned_maps)
            {
                Ok(allocated) => allocated,
                Err(e) => {
                    let Inspection::Query(query) = dns::inspect(message) else {
                        // Never: the fast path takes only what the general
                        // path reads as a query.
                        count(DnsCounter::Malformed);
                        return Some(Outcome::Drop);
                    };
                    return Some(match self.allocation_failed(&query, name, e, count) {
                        Some(Ok(bytes)) => Outcome::Reply(bytes),
                        Some(Err(_)) => {
                            count(DnsCounter::SendErrors);
                            Outcome::PassOn
                        }
                        None => Outcome::PassOn,
                    });
                }
            };
        self.note_allocated(&allocated, name, rule, count);
        let answer = match settings.vip6_prefix {
            Some(prefix) if aaaa => {
                fast.aaaa_answer(ipv6_vip(prefix, allocated.vip), settings.ttl, udp)
            }
            _ => fast.a_answer(allocated.vip, settings.ttl, udp),
        };
        if let Some(bytes) = answer {
            return Some(Outcome::Reply(bytes));
        }
        // Too big for the client's UDP size: the general path's TC answer.
        let Inspection::Query(query) = dns::inspect(message) else {
            count(DnsCounter::Malformed);
            return Some(Outcome::Drop);
        };
        let general = match settings.vip6_prefix {
            Some(prefix) if aaaa => {
                dns::aaaa_answer(&query, ipv6_vip(prefix, allocated.vip), settings.ttl)
            }
            _ => dns::a_answer(&query, allocated.vip, settings.ttl),
        };
        Some(
            match general.and_then(|bytes| dns::fit_udp(&query, bytes)) {
                Ok(bytes) => Outcome::Reply(bytes),
                Err(_) => {
                    count(DnsCounter::SendErrors);
                    Outcome::PassOn
                }
            },
        )
    }

    /// What to do with one DNS message, for either transport: `udp`
    /// applies the client's UDP size to the answer (TC when it does not
    /// fit). `count` records what happened.
    pub(crate) fn decide(
        &self,
        message: &[u8],
        udp: bool,
        count: &mut dyn FnMut(DnsCounter),
    ) -> Outcome {
        // The gateway's current patterns (a reload swaps them), without a
        // lock or a shared reference count on the query path.
        self.state
            .with_patterns(|patterns| self.decide_with(patterns, message, udp, count))
    }

    fn decide_with(
        &self,
        patterns: &crate::matcher::PatternSet,
        message: &[u8],
        udp: bool,
        count: &mut dyn FnMut(DnsCounter),
    ) -> Outcome {
        if let Some(outcome) = self.decide_fast(patterns, message, udp, count) {
            return outcome;
        }
        let settings = &self.settings;
        let query = match dns::inspect(message) {
            Inspection::Response => {
                count(DnsCounter::ResponsesDropped);
                log(
                    LogLevel::Debug,
                    "dns_gateway: dropping a DNS response sent to the gateway",
                );
                return Outcome::Drop;
            }
            Inspection::Malformed(why) => {
                count(DnsCounter::Malformed);
                crate::log_fmt!(
                    LogLevel::Debug,
                    "dns_gateway: dropping a malformed datagram: {why}"
                );
                return Outcome::Drop;
            }
            Inspection::Refused { reply, rcode, why } => {
                let counter = if rcode == ResponseCode::NotImp {
                    DnsCounter::Notimp
                } else {
                    DnsCounter::Formerr
                };
                count(counter);
                crate::log_fmt!(LogLevel::Debug, "dns_gateway: answering {rcode} to {why}");
                return Outcome::Reply(reply);
            }
            Inspection::Query(query) => query,
        };
        let Some(name) = query.name.as_deref().filter(|_| query.class_in) else {
            count(DnsCounter::PassedOn);
            return Outcome::PassOn;
        };
        if settings.debug_panic_on_domain.as_deref() == Some(name) {
            panic!("debug_panic_on_domain: query for {name}");
        }
        let Some(rule) = patterns.best_match(name) else {
            count(DnsCounter::PassedOn);
            return Outcome::PassOn;
        };
        let wants_vip = match query.qtype {
            RecordType::A | RecordType::ANY => true,
            RecordType::AAAA => settings.vip6_prefix.is_some(),
            _ => false,
        };
        let answer = match wants_vip {
            true => {
                match self
                    .state
                    .allocate(name, &settings.pool, settings.require_pinned_maps)
                {
                    Ok(allocated) => {
                        self.note_allocated(&allocated, name, rule, count);
                        match settings.vip6_prefix {
                            Some(prefix) if query.qtype == RecordType::AAAA => dns::aaaa_answer(
                                &query,
                                ipv6_vip(prefix, allocated.vip),
                                settings.ttl,
                            ),
                            _ => dns::a_answer(&query, allocated.vip, settings.ttl),
                        }
                    }
                    Err(e) => match self.allocation_failed(&query, name, e, count) {
                        Some(answer) => answer,
                        None => return Outcome::PassOn,
                    },
                }
            }
            false => {
                count(DnsCounter::Nodata);
                dns::nodata_answer(&query, rule.pattern.zone(), settings.ttl)
            }
        };
        let answer = match answer {
            Ok(bytes) if udp => dns::fit_udp(&query, bytes),
            other => other,
        };
        match answer {
            Ok(bytes) => Outcome::Reply(bytes),
            Err(e) => {
                count(DnsCounter::SendErrors);
                crate::log_fmt!(
                    LogLevel::Error,
                    "dns_gateway: answer for {name}: {e}; passing the query on"
                );
                Outcome::PassOn
            }
        }
    }
}

impl UdpListenerFilter for DnsGatewayFilter {
    fn on_data(&mut self, handle: &mut dyn UdpFilterHandle) -> UdpStatus {
        self.count(handle, DnsCounter::Queries);
        let datagram = handle.datagram();
        let decided = crate::api::catch_panic(|| {
            let shared = &self.shared;
            shared.decide(&datagram, true, &mut |c| {
                if let Some(id) = shared.counters.id(c) {
                    handle.increment_counter(id, 1);
                }
            })
        });
        let outcome = decided.unwrap_or_else(|| {
            // Fail closed: the query is dropped, never passed on half handled.
            self.count(handle, DnsCounter::Panics);
            log(
                LogLevel::Error,
                "dns_gateway: handling a datagram panicked; dropped it",
            );
            Outcome::Drop
        });
        match outcome {
            Outcome::PassOn => UdpStatus::Continue,
            Outcome::Drop => UdpStatus::StopIteration,
            Outcome::Reply(bytes) => {
                let sent = handle
                    .peer_address()
                    .map(|peer| (peer, handle.send_datagram(&bytes, peer)));
                if !matches!(sent, Some((_, true))) {
                    self.count(handle, DnsCounter::SendErrors);
                    crate::log_fmt!(
                        LogLevel::Warn,
                        "dns_gateway: could not send the answer (peer {:?})",
                        sent.map(|s| s.0)
                    );
                }
                UdpStatus::StopIteration
            }
        }
    }
}
