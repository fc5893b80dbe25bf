//! `soma policy verify <path>` runs Gatekeeper `Suite` files (what `gator verify` reads)
//! offline; `soma policy test <dir>` runs Rego `test_` rules. Exit codes: 0 all passed,
//! 1 a test failed, 2 bad input (unreadable path, no suites).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use soma_policy::{regotest, suite};

/// `soma policy verify`.
pub fn verify(path: &Path, run: Option<&str>, verbose: bool) -> ExitCode {
    let filter = match run.map(regex::Regex::new).transpose() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("soma policy verify: --run is not a valid regular expression: {e}");
            return ExitCode::from(2);
        }
    };
    let suites = match suite::find_suites(path) {
        Ok(s) if s.is_empty() => {
            eprintln!(
                "soma policy verify: no Suite files (kind: Suite, apiVersion: test.gatekeeper.sh/v1alpha1) under {}",
                path.display()
            );
            return ExitCode::from(2);
        }
        Ok(s) => s,
        Err(e) => {
            eprintln!("soma policy verify: {e}");
            return ExitCode::from(2);
        }
    };
    let (mut passed, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    for file in &suites {
        let result = suite::run_file(file, filter.as_ref());
        let shown = file.display();
        if result.skipped {
            println!("SKIP  {shown}");
            skipped += 1;
            continue;
        }
        if let Some(e) = &result.error {
            println!("FAIL  {shown}: {e}");
            failed += 1;
            continue;
        }
        for test in &result.tests {
            if test.skipped {
                println!("SKIP  {shown} {}", test.name);
                skipped += 1;
                continue;
            }
            if let Some(e) = &test.error {
                println!("FAIL  {shown} {}: {e}", test.name);
                failed += 1;
                continue;
            }
            for case in &test.cases {
                let name = format!("{}/{}", test.name, case.name);
                match (&case.failure, case.skipped) {
                    (_, true) => {
                        skipped += 1;
                        if verbose {
                            println!("SKIP  {shown} {name}");
                        }
                    }
                    (Some(why), false) => {
                        failed += 1;
                        println!("FAIL  {shown} {name}: {why}");
                    }
                    (None, false) => {
                        passed += 1;
                        if verbose {
                            println!("ok    {shown} {name}");
                        }
                    }
                }
            }
        }
    }
    println!(
        "{} suite(s): {passed} passed, {failed} failed, {skipped} skipped",
        suites.len()
    );
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `soma policy test`.
pub fn rego_test(dir: &Path) -> ExitCode {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "rego"))
            .collect(),
        Err(e) => {
            eprintln!("soma policy test: {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    };
    files.sort();
    let mut sources = Vec::new();
    for f in &files {
        match std::fs::read_to_string(f) {
            Ok(text) => sources.push((f.display().to_string(), text)),
            Err(e) => {
                eprintln!("soma policy test: {}: {e}", f.display());
                return ExitCode::from(2);
            }
        }
    }
    let (tests, modules): (Vec<_>, Vec<_>) = sources
        .iter()
        .partition(|(name, _)| name.ends_with("_test.rego"));
    if tests.is_empty() {
        eprintln!(
            "soma policy test: no *_test.rego files in {}",
            dir.display()
        );
        return ExitCode::from(2);
    }
    let modules: Vec<(&str, &str)> = modules
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let (mut passed, mut failed) = (0usize, 0usize);
    for (name, text) in tests {
        match regotest::run(&modules, (name, text)) {
            Ok(outcomes) => {
                for o in outcomes {
                    if o.passed {
                        passed += 1;
                        println!("PASS  {}", o.name);
                    } else {
                        failed += 1;
                        let why = o.error.unwrap_or_else(|| "not true".to_owned());
                        println!("FAIL  {}: {why}", o.name);
                    }
                }
            }
            Err(e) => {
                failed += 1;
                println!("FAIL  {name}: {e}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
