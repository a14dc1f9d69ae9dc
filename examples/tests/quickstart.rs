//! The quickstart runs as the README says and prints what it promises. It is the example a
//! newcomer runs first, so a change that breaks it fails the suite. (`cargo test` and nextest
//! build the examples; this runs the one of this build, `target/<profile>/examples/quickstart`.)

use std::time::Duration;

#[tokio::test]
async fn the_quickstart_runs_and_prints_its_three_results() {
    let exe = std::env::current_exe().unwrap();
    let program = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the build directory")
        .join("examples")
        .join("quickstart");
    assert!(program.exists(), "{} was not built", program.display());
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&program)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the quickstart finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("diag.add(2, 3) = 5"), "{stdout}");
    assert!(
        stdout.contains("example.greet  = hello, world (attempt 2)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("diag.fail      -> ValueError: on purpose"),
        "{stdout}"
    );
}
