//! The real signing tools for the operator's image tests: cosign, oras and docker-registry
//! (from `scripts/test-deps/signing-tools.sh`), the registry on a free 127.0.0.1 port in a
//! temporary folder, stopped by PID. Same approach as `signatures/tests/support`.
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

/// The tools from `SOMA_COSIGN`/`SOMA_ORAS`/`SOMA_REGISTRY`, or else from the install
/// script; `None` (after saying why) when they cannot be had.
pub fn tools() -> Option<Tools> {
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
            eprintln!("cosign/oras/docker-registry not installable: {other:?}");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(PathBuf::from)
    };
    Some(Tools {
        cosign: get("SOMA_COSIGN")?,
        oras: get("SOMA_ORAS")?,
        registry: get("SOMA_REGISTRY")?,
    })
}

/// A temporary folder, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Result<Self> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("soma-operator-{label}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A docker-registry serving plain HTTP on 127.0.0.1, stopped (by PID) on drop.
pub struct Registry {
    child: Option<Child>,
    pub addr: String,
    _dir: TempDir,
}

impl Registry {
    pub fn start(tools: &Tools) -> Result<Self> {
        let dir = TempDir::new("registry")?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
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

/// A folder where cosign and oras run, with its own HOME and DOCKER_CONFIG so no user
/// configuration or credentials are read.
pub struct Workdir {
    tools: Tools,
    dir: TempDir,
}

impl Workdir {
    pub fn new(tools: &Tools) -> Result<Self> {
        Ok(Workdir {
            tools: tools.clone(),
            dir: TempDir::new("work")?,
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
            .env("COSIGN_PASSWORD", "soma-test")
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

    /// `cosign generate-key-pair --output-key-prefix NAME`; returns the public key PEM.
    pub fn key_pair(&self, name: &str) -> Result<String> {
        self.run(
            &self.tools.cosign,
            &["generate-key-pair", "--output-key-prefix", name],
        )?;
        Ok(std::fs::read_to_string(self.path(&format!("{name}.pub")))?)
    }

    /// Pushes `content` with oras as `registry/repo:tag` (standing in for an image); returns
    /// the manifest digest.
    pub fn push(&self, registry: &str, repo: &str, tag: &str, content: &str) -> Result<String> {
        let file = format!("{tag}.json");
        std::fs::write(self.path(&file), content)?;
        let target = format!("{registry}/{repo}:{tag}");
        self.run(
            &self.tools.oras,
            &[
                "push",
                "--plain-http",
                &target,
                &format!("{file}:application/vnd.oci.image.layer.v1.tar"),
            ],
        )?;
        let digest = self.run(&self.tools.oras, &["resolve", "--plain-http", &target])?;
        Ok(digest.trim().to_string())
    }

    /// `cosign sign --key NAME.key registry/repo@digest`, offline (no transparency log).
    pub fn sign(&self, key: &str, registry: &str, repo: &str, digest: &str) -> Result<()> {
        self.run(
            &self.tools.cosign,
            &[
                "sign",
                "--key",
                &format!("{key}.key"),
                "--tlog-upload=false",
                "--allow-http-registry",
                "--allow-insecure-registry",
                "--yes",
                &format!("{registry}/{repo}@{digest}"),
            ],
        )?;
        Ok(())
    }
}
