//! Which addresses a webhook or Slack URL may reach.
//!
//! A receiver's URL comes from config, but a config is often assembled
//! from many hands, and the point of an SSRF guard is that a URL naming
//! `http://169.254.169.254/...` (cloud credentials) or an internal admin
//! port never gets a request from keywatch. So, unless
//! `alerting.allow_private_addresses` is set, keywatch refuses loopback,
//! private, link-local, shared (CGNAT), unspecified, broadcast, multicast,
//! documentation and reserved addresses, cloud metadata endpoints, and
//! IPv6 forms that embed one of those (IPv4-mapped, NAT64, 6to4).
//!
//! The check runs twice: when the receiver is built (so a bad URL stops
//! start-up with a clear error) and on every connection, through
//! [`PolicyResolver`], because DNS can answer differently later (DNS
//! rebinding). An IP-literal URL never reaches the resolver; it is fixed
//! for the receiver's life, so the build-time check covers it.
//! Redirects are not followed, so no other URL is ever requested.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// Why an address is not one keywatch sends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressClass {
    /// A cloud provider's instance metadata endpoint (credentials live there).
    Metadata,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918 (`10/8`, `172.16/12`, `192.168/16`), unique local `fc00::/7`,
    /// deprecated site-local `fec0::/10`, local-use NAT64 `64:ff9b:1::/48`.
    Private,
    /// `169.254/16`, `fe80::/10`.
    LinkLocal,
    /// Carrier-grade NAT space `100.64/10` (RFC 6598).
    Shared,
    /// `0.0.0.0`, `::` (Linux connects these to the local host).
    Unspecified,
    /// `255.255.255.255`.
    Broadcast,
    /// `224/4`, `ff00::/8`.
    Multicast,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// Anything else not routable on the internet: `0/8`, `240/4`,
    /// `192.0.0/24`, `198.18/15`, IPv4-compatible IPv6, `100::/64`.
    Reserved,
}

impl AddressClass {
    /// The class in words, with its article: "a private address".
    pub fn describe(self) -> &'static str {
        match self {
            AddressClass::Metadata => "a cloud metadata address",
            AddressClass::Loopback => "a loopback address",
            AddressClass::Private => "a private address",
            AddressClass::LinkLocal => "a link-local address",
            AddressClass::Shared => "a shared (carrier-grade NAT) address",
            AddressClass::Unspecified => "the unspecified address",
            AddressClass::Broadcast => "the broadcast address",
            AddressClass::Multicast => "a multicast address",
            AddressClass::Documentation => "a documentation address",
            AddressClass::Reserved => "a reserved address",
        }
    }
}

/// The class that makes `ip` refused, or `None` for an ordinary public
/// address.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    use AddressClass::*;
    let [a, b, c, _] = ip.octets();
    // Metadata first: these sit inside link-local and CGNAT space, and the
    // error should say what is really at stake.
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
        return Some(Metadata);
    }
    Some(match (a, b, c) {
        _ if ip.is_unspecified() => Unspecified,
        _ if ip.is_broadcast() => Broadcast,
        (127, _, _) => Loopback,
        (10, _, _) | (192, 168, _) => Private,
        (172, b, _) if (16..32).contains(&b) => Private,
        (169, 254, _) => LinkLocal,
        (100, b, _) if (64..128).contains(&b) => Shared,
        (224..=239, _, _) => Multicast,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Documentation,
        (0, _, _) | (240..=255, _, _) | (192, 0, 0) => Reserved,
        (198, 18 | 19, _) => Reserved,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    use AddressClass::*;
    let s = ip.segments();
    // AWS's IPv6 metadata endpoint (inside fc00::/7).
    if s == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254] {
        return Some(Metadata);
    }
    if ip.is_unspecified() {
        return Some(Unspecified);
    }
    if ip.is_loopback() {
        return Some(Loopback);
    }
    // Forms that carry an IPv4 address: judge the IPv4 address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 well-known prefix (RFC 6052): reaches the embedded IPv4 host.
        return classify_v4(embedded(s[6], s[7]));
    }
    if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        // IPv4-translated (RFC 2765, ::ffff:0:a.b.c.d): judge the IPv4 address.
        return classify_v4(embedded(s[6], s[7]));
    }
    if s[..2] == [0x2001, 0] {
        // Teredo (RFC 4380): reached through a relay to an IPv4 host whose
        // address is hidden (obfuscated) in the last 32 bits; refuse it.
        return Some(Reserved);
    }
    if s[0] == 0x2002 {
        // 6to4 (RFC 3056): the relay's IPv4 address sits in bits 16..48.
        return classify_v4(embedded(s[1], s[2]));
    }
    if s[..6] == [0; 6] {
        // IPv4-compatible (deprecated): never a real destination.
        return Some(Reserved);
    }
    Some(match s[0] {
        0x64 if s[1] == 0xff9b && s[2] == 1 => Private,
        0xfc00..=0xfdff => Private,
        0xfec0..=0xfeff => Private,
        0xfe80..=0xfebf => LinkLocal,
        0xff00..=0xffff => Multicast,
        0x2001 if s[1] == 0xdb8 => Documentation,
        0x3fff if s[1] < 0x1000 => Documentation,
        0x0100 if s[1..4] == [0, 0, 0] => Reserved,
        _ => return None,
    })
}

/// An address the policy refuses; the text is what an operator reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("url resolves to {addr}, {} (set alerting.allow_private_addresses to allow)", .class.describe())]
pub struct AddressRefused {
    /// The address.
    pub addr: IpAddr,
    /// Why it is refused.
    pub class: AddressClass,
}

/// The first refused address among `addrs`, if any.
pub fn first_refused(addrs: impl IntoIterator<Item = IpAddr>) -> Option<AddressRefused> {
    addrs
        .into_iter()
        .find_map(|addr| classify(addr).map(|class| AddressRefused { addr, class }))
}

/// Why a receiver URL cannot be used. Texts never hold the URL (a Slack
/// URL is a secret); the caller adds the receiver and field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not parseable as an absolute URL.
    #[error("not a valid absolute URL ({0})")]
    NotAUrl(String),
    /// A scheme other than http or https.
    #[error("scheme must be http or https, not \"{0}\"")]
    Scheme(String),
    /// No host (`http:///x`).
    #[error("must name a host")]
    NoHost,
    /// The host is, or resolves to, a refused address.
    #[error(transparent)]
    Refused(#[from] AddressRefused),
}

/// Parses a receiver URL and checks it: http or https, a host, and (unless
/// `allow_private`) no refused address among what the host resolves to
/// right now. A host that does not resolve at all is accepted: DNS may be
/// down at start-up, and every send checks again through
/// [`PolicyResolver`] (a lasting failure ends as a failed delivery).
pub fn check_url(url: &str, allow_private: bool) -> Result<Url, TargetError> {
    let parsed = Url::parse(url).map_err(|e| TargetError::NotAUrl(e.to_string()))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => return Err(TargetError::Scheme(other.to_string())),
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or(TargetError::NoHost)?;
    if allow_private {
        return Ok(parsed);
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if let Some(refused) = first_refused([ip]) {
            return Err(refused.into());
        }
        return Ok(parsed);
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    if let Ok(addrs) = (bare, port).to_socket_addrs() {
        if let Some(refused) = first_refused(addrs.map(|a| a.ip())) {
            return Err(refused.into());
        }
    }
    Ok(parsed)
}

/// reqwest's DNS resolver for receivers: resolves with the system resolver
/// and refuses the connection when any answer is a refused address (an
/// attacker who controls a name can put a private address among public
/// ones). The refusal surfaces as an [`AddressRefused`] in the error's
/// source chain.
#[derive(Clone, Copy)]
pub struct PolicyResolver {
    allow_private: bool,
}

impl PolicyResolver {
    /// A resolver that refuses per the policy unless `allow_private`.
    pub fn new(allow_private: bool) -> PolicyResolver {
        PolicyResolver { allow_private }
    }
}

impl fmt::Debug for PolicyResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyResolver")
            .field("allow_private", &self.allow_private)
            .finish()
    }
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private {
                if let Some(refused) = first_refused(addrs.iter().map(|a| a.ip())) {
                    return Err(Box::new(refused) as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Finds an [`AddressRefused`] in an error's source chain.
pub fn find_refused(err: &(dyn std::error::Error + 'static)) -> Option<AddressRefused> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<AddressRefused>() {
            return Some(*r);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressClass::*;

    #[test]
    fn classification_table() {
        let table: &[(&str, Option<AddressClass>)] = &[
            // Public.
            ("93.184.216.34", None),
            ("8.8.8.8", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("2606:4700:4700::1111", None),
            ("64:ff9b::808:808", None), // NAT64 of 8.8.8.8
            ("2002:808:808::1", None),  // 6to4 via 8.8.8.8
            // Metadata.
            ("169.254.169.254", Some(Metadata)),
            ("100.100.100.200", Some(Metadata)),
            ("fd00:ec2::254", Some(Metadata)),
            ("::ffff:169.254.169.254", Some(Metadata)),
            // Loopback.
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.9", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            // Private.
            ("10.0.0.5", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("fd12:3456::1", Some(Private)),
            ("fc00::1", Some(Private)),
            ("fec0::1", Some(Private)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("64:ff9b::a00:1", Some(Private)), // NAT64 of 10.0.0.1
            ("64:ff9b:1::1", Some(Private)),
            ("2002:a00:1::1", Some(Private)),  // 6to4 via 10.0.0.1
            ("::ffff:0:a00:1", Some(Private)), // IPv4-translated 10.0.0.1
            ("::ffff:0:808:808", None),        // IPv4-translated 8.8.8.8
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Some(Reserved)), // Teredo
            // Link-local.
            ("169.254.1.1", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("::ffff:169.254.0.1", Some(LinkLocal)),
            // Shared, unspecified, broadcast, multicast.
            ("100.64.0.1", Some(Shared)),
            ("100.127.255.254", Some(Shared)),
            ("0.0.0.0", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("255.255.255.255", Some(Broadcast)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            // Documentation and reserved.
            ("192.0.2.1", Some(Documentation)),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.9", Some(Documentation)),
            ("2001:db8::1", Some(Documentation)),
            ("0.1.2.3", Some(Reserved)),
            ("240.0.0.1", Some(Reserved)),
            ("192.0.0.8", Some(Reserved)),
            ("198.18.0.1", Some(Reserved)),
            ("::10.0.0.1", Some(Reserved)),
            ("100::1", Some(Reserved)),
        ];
        for (addr, want) in table {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(classify(ip), *want, "{addr}");
        }
    }

    #[test]
    fn refusal_text_names_address_and_class() {
        let r = first_refused(["8.8.8.8".parse().unwrap(), "10.0.0.5".parse().unwrap()]).unwrap();
        assert_eq!(
            r.to_string(),
            "url resolves to 10.0.0.5, a private address (set alerting.allow_private_addresses to allow)"
        );
        assert!(first_refused(["8.8.8.8".parse().unwrap()]).is_none());
    }

    #[test]
    fn check_url_refuses_literals_schemes_and_names() {
        let refused = |u: &str| match check_url(u, false) {
            Err(TargetError::Refused(r)) => r.class,
            other => panic!("{u}: {other:?}"),
        };
        assert_eq!(
            refused("http://169.254.169.254/latest/meta-data/"),
            Metadata
        );
        assert_eq!(refused("http://[::ffff:127.0.0.1]:8080/x"), Loopback);
        assert_eq!(refused("http://[fd00:ec2::254]/"), Metadata);
        // The URL parser normalises odd IPv4 spellings before we look.
        assert_eq!(refused("http://0x7f.1/"), Loopback);
        assert_eq!(refused("http://2130706433/"), Loopback);
        // `localhost` resolves (from /etc/hosts) to loopback.
        assert_eq!(refused("http://localhost:9/hook"), Loopback);

        assert!(
            matches!(check_url("ftp://example.com/", false), Err(TargetError::Scheme(s)) if s == "ftp")
        );
        assert!(matches!(
            check_url("file:///etc/passwd", false),
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            check_url("not a url", false),
            Err(TargetError::NotAUrl(_))
        ));
        assert!(check_url("https://93.184.216.34/hook", false).is_ok());
        // Allowed when the operator says so.
        assert!(check_url("http://127.0.0.1:8080/hook", true).is_ok());
        assert!(check_url("http://localhost:8080/hook", true).is_ok());
    }

    #[test]
    fn errors_do_not_echo_the_url() {
        for u in [
            "ftp://hooks.example/services/T000/B000/XXXXSECRETXXXX",
            "http://127.0.0.1/services/T000/B000/XXXXSECRETXXXX",
            "hooks.example/services/T000/B000/XXXXSECRETXXXX",
        ] {
            let text = check_url(u, false).unwrap_err().to_string();
            assert!(!text.contains("XXXXSECRETXXXX"), "{text}");
        }
    }

    #[tokio::test]
    async fn resolver_refuses_a_name_resolving_to_loopback() {
        let r = PolicyResolver::new(false);
        let err = match r.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost was not refused"),
            Err(e) => e,
        };
        let refused = find_refused(&*err).expect("an AddressRefused");
        assert_eq!(refused.class, Loopback);

        let allowing = PolicyResolver::new(true);
        let addrs: Vec<SocketAddr> = match allowing.resolve("localhost".parse().unwrap()).await {
            Ok(a) => a.collect(),
            Err(e) => panic!("{e}"),
        };
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
