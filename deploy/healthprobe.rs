//! `healthprobe`: the container image's health check, for an image with no shell and no curl.
//!
//! The runtime image holds every binary (`worker`, `scheduler`, `billing-api`,
//! `fake-cloudpayments`, `monitor`), so one `HEALTHCHECK` has to fit whichever of them is PID 1.
//! With no argument this probe reads `/proc/1/cmdline` and `/proc/1/environ` (same user, same
//! container) and checks the endpoint that program serves, at the address it was told to bind:
//!
//! | PID 1 | address from (default) | checks |
//! |---|---|---|
//! | `worker` | `--metrics-bind` / `METRICS_BIND` (`127.0.0.1:9808`; `off`: nothing to check) | `GET /livez` |
//! | `scheduler` | `--metrics-bind` / `METRICS_BIND` (`127.0.0.1:9809`) | `GET /healthz` |
//! | `billing-api` | `--http-bind` / `BILLING_HTTP_BIND` (`127.0.0.1:8088`) | `GET /healthz` |
//! | `monitor` | `--bind` / `MONITOR_BIND` (`127.0.0.1:5555`) | `GET /livez` |
//! | `fake-cloudpayments` | `--bind` / `FAKE_CLOUDPAYMENTS_BIND` (`127.0.0.1:8070`) | TCP connect |
//!
//! `healthprobe http://HOST:PORT/PATH` checks that URL instead; `healthprobe tcp://HOST:PORT`
//! only connects. Exit status 0 when healthy (an HTTP 2xx), 1 otherwise, with one line saying
//! why. A wildcard bind (`0.0.0.0`, `[::]`) is probed on loopback.
//!
//! Only `std`, so the image build compiles it with a bare `rustc` (no Cargo, no crates), and it
//! is not a workspace member. Test: `rustc --edition 2021 --test deploy/healthprobe.rs -o /tmp/hp && /tmp/hp`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// Connect, write and read each get this long; Docker's own `--timeout` bounds the whole run.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// Nothing to check (the program serves no endpoint): healthy while it runs.
    Nothing(String),
    Tcp(String),
    Http {
        host_port: String,
        path: String,
    },
}

fn main() -> ExitCode {
    let target = match std::env::args().nth(1) {
        Some(url) => parse_url(&url),
        None => from_pid1(),
    };
    match target.and_then(|t| check(&t)) {
        Ok(what) => {
            println!("healthy: {what}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("unhealthy: {why}");
            ExitCode::FAILURE
        }
    }
}

fn parse_url(url: &str) -> Result<Target, String> {
    if let Some(rest) = url.strip_prefix("tcp://") {
        return Ok(Target::Tcp(rest.trim_end_matches('/').to_owned()));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: expected http://host:port/path or tcp://host:port"))?;
    let (host_port, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok(Target::Http {
        host_port: host_port.to_owned(),
        path: path.to_owned(),
    })
}

/// What to probe for the program running as PID 1.
fn from_pid1() -> Result<Target, String> {
    let cmdline = std::fs::read("/proc/1/cmdline").map_err(|e| format!("/proc/1/cmdline: {e}"))?;
    let environ = std::fs::read("/proc/1/environ").unwrap_or_default();
    let args = nul_split(&cmdline);
    let env = nul_split(&environ);
    target_for(&args, &env)
}

fn nul_split(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn target_for(args: &[String], env: &[String]) -> Result<Target, String> {
    let program = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_owned())
        .ok_or("PID 1 has an empty command line")?;
    // (flag, variable, default, path); an empty path means a TCP connect.
    let (flag, var, default, path) = match program.as_str() {
        "worker" => ("--metrics-bind", "METRICS_BIND", "127.0.0.1:9808", "/livez"),
        "scheduler" => (
            "--metrics-bind",
            "METRICS_BIND",
            "127.0.0.1:9809",
            "/healthz",
        ),
        "billing-api" => (
            "--http-bind",
            "BILLING_HTTP_BIND",
            "127.0.0.1:8088",
            "/healthz",
        ),
        "monitor" => ("--bind", "MONITOR_BIND", "127.0.0.1:5555", "/livez"),
        "fake-cloudpayments" => ("--bind", "FAKE_CLOUDPAYMENTS_BIND", "127.0.0.1:8070", ""),
        other => {
            return Err(format!(
                "PID 1 is {other:?}, which this probe does not know"
            ))
        }
    };
    let bind = flag_value(&args[1..], flag)
        .or_else(|| env_value(env, var))
        .unwrap_or_else(|| default.to_owned());
    if bind == "off" {
        return Ok(Target::Nothing(format!(
            "{program} serves nothing ({var}=off)"
        )));
    }
    let host_port = loopback_for_wildcard(&bind);
    Ok(if path.is_empty() {
        Target::Tcp(host_port)
    } else {
        Target::Http {
            host_port,
            path: path.to_owned(),
        }
    })
}

fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == flag {
            return it.next().cloned();
        }
        if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v.to_owned());
        }
    }
    None
}

fn env_value(env: &[String], var: &str) -> Option<String> {
    env.iter()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == var)
        .map(|(_, v)| v.to_owned())
}

fn loopback_for_wildcard(bind: &str) -> String {
    if let Some(port) = bind.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = bind.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        bind.to_owned()
    }
}

fn connect(host_port: &str) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = host_port
        .to_socket_addrs()
        .map_err(|e| format!("{host_port}: {e}"))?
        .collect();
    let mut last = format!("{host_port}: no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

fn check(target: &Target) -> Result<String, String> {
    match target {
        Target::Nothing(why) => Ok(why.clone()),
        Target::Tcp(host_port) => connect(host_port).map(|_| format!("tcp://{host_port} accepts")),
        Target::Http { host_port, path } => {
            let mut stream = connect(host_port)?;
            stream.set_read_timeout(Some(TIMEOUT)).ok();
            stream.set_write_timeout(Some(TIMEOUT)).ok();
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host_port}\r\nUser-Agent: healthprobe\r\nConnection: close\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .map_err(|e| format!("http://{host_port}{path}: {e}"))?;
            // The status line is all we need; read until it is complete.
            let mut head = Vec::with_capacity(128);
            let mut buf = [0u8; 128];
            while !head.contains(&b'\n') && head.len() < 4096 {
                let n = stream
                    .read(&mut buf)
                    .map_err(|e| format!("http://{host_port}{path}: {e}"))?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let status = status_code(&head)
                .ok_or_else(|| format!("http://{host_port}{path}: no HTTP status line"))?;
            if (200..300).contains(&status) {
                Ok(format!("http://{host_port}{path} answered {status}"))
            } else {
                Err(format!("http://{host_port}{path} answered {status}"))
            }
        }
    }
}

fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn http(host_port: &str, path: &str) -> Target {
        Target::Http {
            host_port: host_port.to_owned(),
            path: path.to_owned(),
        }
    }

    #[test]
    fn each_program_is_probed_where_it_listens() {
        let none: Vec<String> = Vec::new();
        assert_eq!(
            target_for(&strings(&["/usr/local/bin/worker"]), &none),
            Ok(http("127.0.0.1:9808", "/livez"))
        );
        assert_eq!(
            target_for(
                &strings(&["worker"]),
                &strings(&["METRICS_BIND=0.0.0.0:9900"])
            ),
            Ok(http("127.0.0.1:9900", "/livez"))
        );
        assert_eq!(
            target_for(
                &strings(&["scheduler", "--metrics-bind", "[::]:9809"]),
                &strings(&["METRICS_BIND=0.0.0.0:1"])
            ),
            Ok(http("[::1]:9809", "/healthz"))
        );
        assert_eq!(
            target_for(
                &strings(&["billing-api", "--http-bind=10.0.0.5:8088"]),
                &none
            ),
            Ok(http("10.0.0.5:8088", "/healthz"))
        );
        assert_eq!(
            target_for(
                &strings(&["monitor"]),
                &strings(&["MONITOR_BIND=0.0.0.0:5555"])
            ),
            Ok(http("127.0.0.1:5555", "/livez"))
        );
        assert_eq!(
            target_for(&strings(&["fake-cloudpayments"]), &none),
            Ok(Target::Tcp("127.0.0.1:8070".into()))
        );
        assert!(matches!(
            target_for(&strings(&["worker"]), &strings(&["METRICS_BIND=off"])),
            Ok(Target::Nothing(_))
        ));
        assert!(target_for(&strings(&["sh"]), &none).is_err());
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_url("http://127.0.0.1:9808/livez"),
            Ok(http("127.0.0.1:9808", "/livez"))
        );
        assert_eq!(parse_url("http://h:1"), Ok(http("h:1", "/")));
        assert_eq!(parse_url("tcp://h:2"), Ok(Target::Tcp("h:2".into())));
        assert!(parse_url("https://h/x").is_err());
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_code(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"garbage"), None);
    }

    fn serve_once(response: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            s.write_all(response.as_bytes()).unwrap();
        });
        addr
    }

    #[test]
    fn a_2xx_is_healthy_anything_else_is_not() {
        let ok = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        assert!(check(&http(&ok, "/livez")).is_ok());
        let down = serve_once("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(
            check(&http(&down, "/readyz")),
            Err(format!("http://{down}/readyz answered 503"))
        );
        // A port nobody listens on: bind, note the port, close.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(check(&Target::Tcp(closed.to_string())).is_err());
    }
}
