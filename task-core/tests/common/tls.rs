//! A private CA, certificates it signed (`server` for `localhost`, `client`), made with the
//! `openssl` command, and socat (OpenSSL) terminating TLS in front of a local service: the TLS
//! listeners of the `amqps://` and `rediss://` tests (`scripts/services` installs both tools).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A private CA and the certificates it signed, in a temporary directory.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn make() -> Pki {
        let dir = std::env::temp_dir().join(format!("tls-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl (scripts/services installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=task-core test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        for (name, ext) in [
            (
                "server",
                "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            ssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            ssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ]);
            // rustls takes PKCS#8 keys; `openssl req -nodes` writes them so already.
        }
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// socat listening with TLS on a free loopback port and forwarding each connection to the plain
/// service on `127.0.0.1:<upstream>`.
pub struct TlsListener {
    child: Child,
    pub port: u16,
}

impl TlsListener {
    pub fn start(pki: &Pki, upstream: u16, require_client_certificate: bool) -> TlsListener {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let verify = if require_client_certificate {
            format!("verify=1,cafile={}", pki.path("ca.pem"))
        } else {
            "verify=0".to_owned()
        };
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},{verify}",
            pki.path("server.pem"),
            pki.path("server.key"),
        );
        // `-d -d` makes socat say when it listens: wait for that line rather than polling the
        // port, then keep draining its log so it never blocks on a full pipe.
        let mut child = Command::new("socat")
            .args([
                "-d",
                "-d",
                listen.as_str(),
                &format!("TCP:127.0.0.1:{upstream}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("socat (scripts/services installs it)");
        let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        for line in log.by_ref() {
            let line = line.unwrap_or_default();
            let ready = line.contains("listening on");
            seen.push(line);
            if ready {
                std::thread::spawn(move || log.for_each(drop));
                return TlsListener { child, port };
            }
        }
        let _ = child.wait();
        panic!(
            "socat ended before listening on {port}:\n{}",
            seen.join("\n")
        );
    }

    /// `amqps://guest:guest@<host>:<port>/%2f` or `rediss://<host>:<port>/0`.
    pub fn url(&self, scheme: &str, host: &str) -> String {
        match scheme {
            "amqps" => format!("amqps://guest:guest@{host}:{}/%2f", self.port),
            _ => format!("{scheme}://{host}:{}/0", self.port),
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
