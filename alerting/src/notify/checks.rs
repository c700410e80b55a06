//! A receiver's config checked at start-up: the SMTP relay's address and
//! credentials, the dashboard link. (Fields that do not apply to a
//! receiver's type are refused when the config is read: see
//! `config::ReceiverFile`.)

use super::*;

/// Whether an SMTP host is this machine (clear-text logins are allowed only there).
pub(crate) fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The private-address guard for an SMTP relay. Mail relays live on
/// internal networks, so loopback and private addresses are allowed; every
/// other class the guard refuses for webhooks (cloud metadata, link-local,
/// unspecified, multicast, documentation, reserved) is refused here too,
/// for the literal host and for what its name resolves to at start-up.
pub(crate) fn check_smtp_host(
    cfg: &EmailConfig,
    field: &dyn Fn(&str) -> String,
) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let host = cfg.smtp_host.trim();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<std::net::IpAddr> = match bare.parse() {
        Ok(ip) => vec![ip],
        Err(_) => (bare, cfg.smtp_port.unwrap_or(25))
            .to_socket_addrs()
            .map(|a| a.map(|s| s.ip()).collect())
            .unwrap_or_default(),
    };
    let refused = addrs.into_iter().find_map(|addr| {
        ssrf::classify(addr)
            .filter(|c| {
                !matches!(
                    c,
                    ssrf::AddressClass::Loopback | ssrf::AddressClass::Private
                )
            })
            .map(|class| ssrf::AddressRefused { addr, class })
    });
    match refused {
        Some(r) => Err(format!(
            "{}: {} is {} (set alerting.allow_private_addresses to allow)",
            field("smtp_host"),
            r.addr,
            r.class.describe()
        )),
        None => Ok(()),
    }
}

/// The SMTP transport of an email receiver.
pub(crate) fn email_transport(
    cfg: &EmailConfig,
    timeout: Duration,
    field: &dyn Fn(&str) -> String,
) -> Result<Transport, String> {
    let host = cfg.smtp_host.trim();
    let builder = match cfg.tls {
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host).port(25),
        SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
            .map_err(|e| format!("{}: {}", field("smtp_host"), error_chain(&e)))?,
        SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(host)
            .map_err(|e| format!("{}: {}", field("smtp_host"), error_chain(&e)))?,
    };
    let mut builder = builder.timeout(Some(timeout));
    if let Some(port) = cfg.smtp_port {
        builder = builder.port(port);
    }
    let password = &cfg.password;
    let has_password = password.env.is_some() || password.file.is_some();
    match cfg.username.as_deref().filter(|u| !u.is_empty()) {
        Some(_) if cfg.tls == SmtpTls::None && !is_loopback_host(host) => {
            return Err(format!(
                "{}: a password would travel in clear text with tls = \"none\"; use starttls or tls (none is for local catchers)",
                field("username")
            ))
        }
        Some(user) => {
            let pass: Secret = password.resolve(&field("password"))?;
            builder = builder.credentials(Credentials::new(
                user.to_string(),
                pass.expose().to_string(),
            ));
        }
        None if has_password => {
            return Err(format!(
                "{}: a password needs a username (set {})",
                field("password_env"),
                field("username")
            ))
        }
        None => {}
    }
    let from_text = cfg.from.as_str();
    let from: Mailbox = from_text.parse().map_err(|e| {
        format!(
            "{}: \"{from_text}\" is not an email address ({e})",
            field("from")
        )
    })?;
    if cfg.to.is_empty() {
        return Err(format!("{}: give at least one recipient", field("to")));
    }
    let to = cfg
        .to
        .iter()
        .map(|t| {
            t.parse::<Mailbox>()
                .map_err(|e| format!("{}: \"{t}\" is not an email address ({e})", field("to")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Transport::Email {
        builder,
        mailer: OnceLock::new(),
        from,
        to,
    })
}

/// A bad dashboard link would make Slack refuse every message (a button
/// URL must be valid), so it is checked with the receivers.
pub(crate) fn check_dashboard_url(template: &str) -> Result<(), String> {
    if template.is_empty() {
        return Ok(());
    }
    let probe = template.replace("{user_id}", "user");
    match Url::parse(&probe) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && probe.len() <= 2000 => Ok(()),
        _ => Err(format!(
            "alerting.dashboard_url: must be an http or https URL (with {{user_id}} where the user id goes), not \"{template}\""
        )),
    }
}
