//! Test harness: the real cosign CLI, oras and docker-registry (from
//! `scripts/test-deps/signing-tools.sh`), the registry started on a free 127.0.0.1 port in a
//! temporary folder and stopped by PID.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Paths of the three tools.
#[derive(Clone, Debug)]
pub struct Tools {
    pub cosign: PathBuf,
    pub oras: PathBuf,
    pub registry: PathBuf,
}

/// The tools from `SOMA_COSIGN`/`SOMA_ORAS`/`SOMA_REGISTRY`, or else from running the install
/// script (once per test binary: tests run in parallel and must not race apt); `None` (after
/// saying why) when they cannot be had, so the caller fails.
pub fn tools() -> Option<Tools> {
    static TOOLS: std::sync::OnceLock<Option<Tools>> = std::sync::OnceLock::new();
    let tools = TOOLS.get_or_init(find_or_install_tools).clone();
    if tools.is_none() {
        eprintln!("cosign/oras/docker-registry are not available");
    }
    tools
}

fn find_or_install_tools() -> Option<Tools> {
    let from_env = || -> Option<Tools> {
        Some(Tools {
            cosign: std::env::var_os("SOMA_COSIGN")?.into(),
            oras: std::env::var_os("SOMA_ORAS")?.into(),
            registry: std::env::var_os("SOMA_REGISTRY")?.into(),
        })
    };
    if let Some(t) = from_env() {
        return Some(t);
    }
    let script = Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("../scripts/test-deps/signing-tools.sh");
    let out = match Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
    {
        Ok(out) if out.status.success() => out,
        other => {
            eprintln!(
                "cosign/oras/docker-registry could not be installed by {}: {other:?}",
                script.display()
            );
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(PathBuf::from)
    };
    let tools = Tools {
        cosign: get("SOMA_COSIGN")?,
        oras: get("SOMA_ORAS")?,
        registry: get("SOMA_REGISTRY")?,
    };
    Some(tools)
}

/// A docker-registry serving plain HTTP on 127.0.0.1, stopped (by PID) on drop.
pub struct Registry {
    child: Option<Child>,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start(tools: &Tools) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(&tools.registry)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?;
        let mut registry = Registry {
            child: Some(child),
            addr,
            _dir: dir,
        };
        for _ in 0..200 {
            if TcpStream::connect(&registry.addr).is_ok() {
                return Ok(registry);
            }
            if let Some(status) = registry
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("docker-registry exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("docker-registry did not listen on {}", registry.addr)
    }

    /// The registry's storage folder (tests that tamper with stored blobs write here).
    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// Stops the registry by its PID and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A folder where cosign and oras run, with its own HOME and DOCKER_CONFIG so no user
/// configuration or credentials are read.
pub struct Workdir {
    pub tools: Tools,
    pub dir: tempfile::TempDir,
}

pub const PASSWORD: &str = "soma-test";

impl Workdir {
    pub fn new(tools: &Tools) -> Result<Self> {
        Ok(Workdir {
            tools: tools.clone(),
            dir: tempfile::tempdir()?,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, program: &Path, args: &[&str]) -> Result<String> {
        let out = Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("DOCKER_CONFIG", self.dir.path())
            .env("COSIGN_PASSWORD", PASSWORD)
            .env("TUF_ROOT", self.dir.path().join("tuf"))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} {args:?} failed: {}\n{}",
                program.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn cosign(&self, args: &[&str]) -> Result<String> {
        self.run(&self.tools.cosign.clone(), args)
    }

    pub fn oras(&self, args: &[&str]) -> Result<String> {
        self.run(&self.tools.oras.clone(), args)
    }

    /// `cosign generate-key-pair --output-key-prefix NAME`; returns the public key PEM.
    pub fn key_pair(&self, name: &str) -> Result<String> {
        self.cosign(&["generate-key-pair", "--output-key-prefix", name])?;
        Ok(std::fs::read_to_string(self.path(&format!("{name}.pub")))?)
    }

    /// Writes `content` to a file and pushes it with oras as `registry/repo:tag`; returns the
    /// manifest digest.
    pub fn push(&self, registry: &str, repo: &str, tag: &str, content: &str) -> Result<String> {
        let file = format!("{tag}.json");
        std::fs::write(self.path(&file), content)?;
        let target = format!("{registry}/{repo}:{tag}");
        self.oras(&[
            "push",
            "--plain-http",
            &target,
            &format!("{file}:application/vnd.soma.capsule.v1+json"),
        ])?;
        let digest = self.oras(&["resolve", "--plain-http", &target])?;
        Ok(digest.trim().to_string())
    }

    /// `cosign sign --key NAME.key` of `registry/repo@digest`, offline (no transparency log).
    pub fn sign(&self, key: &str, registry: &str, repo: &str, digest: &str) -> Result<()> {
        self.cosign(&[
            "sign",
            "--key",
            &format!("{key}.key"),
            "--tlog-upload=false",
            "--allow-http-registry",
            "--allow-insecure-registry",
            "--yes",
            &format!("{registry}/{repo}@{digest}"),
        ])?;
        Ok(())
    }

    /// `cosign sign-blob --key NAME.key FILE --output-signature ...`; returns the base64 signature.
    pub fn sign_blob(&self, key: &str, file: &str, extra: &[&str]) -> Result<String> {
        let sig = format!("{file}.sig");
        let mut args = vec!["sign-blob", "--key", &format!("{key}.key")]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        args.extend(["--tlog-upload=false", "--yes", "--output-signature", &sig].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(file.to_string());
        self.cosign(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        Ok(std::fs::read_to_string(self.path(&sig))?.trim().to_string())
    }
}

/// A verifier that may use plain HTTP to `registry`.
pub fn verifier(registry: &str) -> soma_signatures::Verifier {
    verifier_with_roots(registry, Vec::new())
}

/// A verifier that may use plain HTTP to `registry` and trusts `roots` for keyless signatures.
pub fn verifier_with_roots(registry: &str, roots: Vec<String>) -> soma_signatures::Verifier {
    soma_signatures::Verifier::new(soma_signatures::TrustConfig {
        insecure_registries: vec![registry.to_string()],
        keyless_roots: roots,
        ..Default::default()
    })
    .expect("the test's trusted roots parse")
}

/// The tools, or a failed test saying how to install them: a test that cannot reach its
/// tools must never pass.
#[macro_export]
macro_rules! tools_or_fail {
    () => {
        match support::tools() {
            Some(t) => t,
            None => panic!(
                "cosign, oras and docker-registry are not available: run scripts/test-deps/signing-tools.sh (or set SOMA_COSIGN, SOMA_ORAS, SOMA_REGISTRY)"
            ),
        }
    };
}
