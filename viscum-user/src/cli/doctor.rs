//! `viscum doctor`: what this kernel offers the datapath and what the
//! verifier made of the loaded programs.

use clap::Args;

use super::{Result, print_json, print_table};
use crate::{engine::Pins, features::Report};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as JSON (for scripts and bug reports).
    #[arg(long)]
    pub json: bool,
}

pub fn run(pins: &Pins, args: DoctorArgs) -> Result<()> {
    let report = Report::probe(pins);
    if args.json {
        return print_json(&report);
    }
    println!(
        "kernel      {} ({}, {})",
        report.kernel, report.arch, report.byte_order
    );
    println!("attach      {}", report.attach_mode);
    println!("redirect    {}", report.redirect);
    println!(
        "btf         {}",
        if report.btf {
            "yes"
        } else {
            "no (/sys/kernel/btf/vmlinux missing)"
        }
    );
    println!(
        "jit         {}",
        match report.jit {
            Some(0) => "off (programs are interpreted: slower)".to_owned(),
            Some(n) => format!("on ({n})"),
            None => "unknown".to_owned(),
        }
    );
    if report.forwarding.is_empty() {
        println!("forwarding  on for IPv4 and IPv6");
    } else {
        for problem in &report.forwarding {
            println!("forwarding  {problem}");
        }
    }
    if report.missing.is_empty() {
        println!("helpers     all required helpers present");
    } else {
        println!(
            "helpers     MISSING: {} (the datapath cannot load)",
            report.missing.join(", ")
        );
    }
    let rows: Vec<Vec<String>> = report
        .helpers
        .iter()
        .map(|h| {
            vec![
                h.name.to_owned(),
                h.since.to_owned(),
                match h.available {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "unknown".into(),
                },
            ]
        })
        .collect();
    println!();
    print_table(&["HELPER", "SINCE", "AVAILABLE"], &rows);
    println!();
    if report.programs.is_empty() {
        println!(
            "programs    none loaded under {} (run `viscum attach IFACE`)",
            pins.dir.display()
        );
    } else {
        let opt = |v: Option<u32>| v.map_or("-".to_owned(), |n| n.to_string());
        let rows: Vec<Vec<String>> = report
            .programs
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.id.to_string(),
                    opt(p.verified_insns),
                    opt(p.xlated_bytes),
                    opt(p.jited_bytes),
                ]
            })
            .collect();
        print_table(
            &[
                "PROGRAM",
                "ID",
                "VERIFIED_INSNS",
                "XLATED_BYTES",
                "JITED_BYTES",
            ],
            &rows,
        );
    }
    Ok(())
}
