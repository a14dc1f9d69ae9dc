//! The ledger over TLS: a private PostgreSQL server (initdb, as the `postgres` user) that accepts
//! only TLS connections, with a certificate for `localhost` from a CA this test makes with the
//! `openssl` command. `DATABASE_URL` carries libpq's `sslmode` and `sslrootcert`.

use std::path::{Path, PathBuf};
use std::process::Command;

// The private CA and `localhost` certificate of task-core's TLS tests (made with `openssl`).
#[allow(dead_code, unreachable_pub)]
#[path = "../../task-core/tests/common/tls.rs"]
mod tls;

use tls::Pki;

/// A PostgreSQL server of its own on a free port, stopped and removed on drop.
struct TlsPostgres {
    bin: PathBuf,
    data: String,
    port: u16,
    /// Holds the certificates and the data directory; removed after the server stops.
    pki: Pki,
}

fn run(what: &str, cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    cmd
}

impl TlsPostgres {
    fn start() -> TlsPostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL from Debian (scripts/services installs it)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let pki = Pki::make();
        // The server reads its key as `postgres`, and only from a file no one else can read.
        run(
            "chown",
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pki.path("")),
        );
        run(
            "chmod",
            Command::new("chmod")
                .arg("0600")
                .arg(pki.path("server.key")),
        );
        let data = pki.path("data");
        run(
            "initdb",
            as_postgres(&bin, "initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(&data),
        );
        // TLS or nothing over TCP.
        std::fs::write(
            Path::new(&data).join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} \
             -c ssl_key_file={} -c fsync=off",
            pki.path(""),
            pki.path("server.pem"),
            pki.path("server.key")
        );
        run(
            "pg_ctl start",
            as_postgres(&bin, "pg_ctl")
                .args(["-w", "-t", "60", "-l"])
                .arg(pki.path("server.log"))
                .args(["-D", &data, "-o", &options, "start"]),
        );
        TlsPostgres {
            bin,
            data,
            port,
            pki,
        }
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{params}", self.port)
    }

    fn ca(&self) -> String {
        self.pki.path("ca.pem")
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .args(["-m", "immediate", "-D", &self.data, "stop"])
            .output();
    }
}

#[tokio::test]
async fn the_ledger_connects_and_migrates_over_verified_tls_and_nothing_else() {
    let pg = TlsPostgres::start();

    let verified = pg.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", pg.ca()),
    );
    let pool = billing_tasks::db::connect(&verified, 2)
        .await
        .expect("the ledger over TLS, its migrations applied");
    let (ssl, version): (bool, String) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(ssl, "the session is encrypted");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'invoice'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 1, "the migrations ran over TLS");
    pool.close().await;

    // Plain text is refused by the server; an unknown CA and a name the certificate lacks by us.
    let refused = [
        ("plain text", pg.url("localhost", "sslmode=disable")),
        ("unknown CA", pg.url("localhost", "sslmode=verify-full")),
        (
            "wrong name",
            pg.url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={}", pg.ca()),
            ),
        ),
    ];
    for (what, url) in refused {
        let err = billing_tasks::db::connect(&url, 1).await.expect_err(what);
        println!("{what}: {err}");
    }
    println!("ledger over TLS ({version}): migrated, session encrypted");
}
