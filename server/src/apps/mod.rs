//! The vendor's applications: what a release's `app.toml` lists ([`manifest`]), how their
//! health is probed ([`probe`]), and the supervisor that runs them ([`supervisor`]).

pub mod manifest;
pub mod probe;
pub mod supervisor;

pub use manifest::{AppSpec, Manifest, Probe};
pub use supervisor::{Apps, stop_orphans};

/// Runs each application's own self-check (`check = [...]`) in `release`, as the
/// preflight does before anyone is warned. The error names the application and quotes its
/// output.
pub async fn run_checks(manifest: &Manifest, release: &std::path::Path) -> anyhow::Result<()> {
    const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
    for app in &manifest.apps {
        let Some(check) = &app.check else { continue };
        let program = manifest::resolve_program(release, &check[0]);
        let output = tokio::time::timeout(
            CHECK_TIMEOUT,
            tokio::process::Command::new(&program)
                .args(&check[1..])
                .current_dir(release)
                .envs(&app.env)
                .env_remove(crate::auth::ADMIN_PASSWORD_ENV)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "application {:?}: its self-check did not finish within {} s",
                app.name,
                CHECK_TIMEOUT.as_secs()
            )
        })?
        .map_err(|err| {
            anyhow::anyhow!(
                "application {:?}: cannot run its self-check {}: {err}",
                app.name,
                program.display()
            )
        })?;
        if !output.status.success() {
            anyhow::bail!(
                "application {:?}: its self-check failed ({}){}",
                app.name,
                output.status,
                probe::last_line(&output.stdout, &output.stderr)
                    .map(|line| format!(": {line}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
