//! `audit verify`: the hash chain of an audit log's files, and the lines it must hold.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};

use meshca::signer::audit::{self, VerifyOutcome};

use super::output::{say, say_json, to_stderr};

/// `meshca audit verify`: each file's chain, each continuing the one before; with `json`,
/// one object on stdout, a break included (`intact: false`, with `error` and
/// `exit_status` as every command's error has them, and where it broke).
pub(crate) fn audit_verify(
    files: &[PathBuf],
    expect_hashes: &[String],
    json: bool,
) -> Result<ExitCode> {
    // The last hash and record time of the file before: the next file continues both.
    let mut after: Option<(String, Option<String>)> = None;
    let mut missing = expect_hashes.to_vec();
    let mut verified = Vec::new();
    let mut records_total = 0;
    for file in files {
        let follows = after.as_ref().map(|(last_hash, last_time)| audit::Follows {
            last_hash,
            last_time: last_time.as_deref(),
        });
        match audit::verify_file(file, follows, expect_hashes)? {
            VerifyOutcome::Intact {
                records,
                last_hash,
                continues_from,
                anchored,
                clock_steps_back,
                clock_steps_back_total,
                last_time,
            } => {
                if !json {
                    say!(
                        "meshca: audit log {} is intact: {records} records, last hash {last_hash}",
                        file.display()
                    );
                    if let Some(earlier) = &continues_from {
                        say!(
                            "  it continues an earlier file (rotated away) whose last line hashes to {earlier}: verify them together, oldest first, to check the link"
                        );
                    }
                    for (hash, line) in &anchored {
                        say!(
                            "  holds the expected line {hash}: line {line}, {} records after it",
                            records - line
                        );
                    }
                    for step in &clock_steps_back {
                        // Line 1 of a file after another follows that file's last record.
                        let before = if step.line == 1 && after.is_some() {
                            "the last record of the file before"
                        } else {
                            "the record before it"
                        };
                        say!(
                            "  warning: line {} is timed {}, {} s before {before} ({}): the signer's clock stepped back there: set back (what was issued after it carries dates too early), or put right after running ahead (what was issued before it carries dates too late); check the host's time synchronisation",
                            step.line,
                            step.time,
                            step.seconds,
                            step.previous_time
                        );
                    }
                    if clock_steps_back_total > clock_steps_back.len() {
                        say!(
                            "  warning: and {} more records timed over {} s before the record before them",
                            clock_steps_back_total - clock_steps_back.len(),
                            audit::CLOCK_STEP_NOTED.as_secs()
                        );
                    }
                }
                missing.retain(|m| !anchored.iter().any(|(hash, _)| hash == m));
                records_total += records;
                verified.push(serde_json::json!({
                    "file": file.display().to_string(),
                    "records": records,
                    "last_hash": last_hash,
                    "continues_from": continues_from,
                    "expected_lines": anchored.iter().map(|(hash, line)| serde_json::json!({
                        "hash": hash,
                        "line": line,
                        "records_after": records - line,
                    })).collect::<Vec<_>>(),
                    "clock_steps_back": clock_steps_back.iter().map(|step| serde_json::json!({
                        "line": step.line,
                        "time": step.time,
                        "previous_time": step.previous_time,
                        "seconds": step.seconds,
                    })).collect::<Vec<_>>(),
                    "clock_steps_back_total": clock_steps_back_total,
                }));
                after = Some((last_hash, last_time));
            }
            VerifyOutcome::Broken { line, problem } => {
                let error = format!(
                    "audit log {} breaks at line {line}: {problem}",
                    file.display()
                );
                if !json {
                    bail!("{error}");
                }
                let broken = serde_json::json!({
                    "file": file.display().to_string(),
                    "line": line,
                    "problem": problem,
                });
                // The files after the break were not read: whether they hold the
                // expected hashes is unknown, not "none missing".
                return audit_verify_failed(&error, verified, Some(broken), None);
            }
        }
    }
    if !missing.is_empty() {
        let error = format!(
            "no line of {} hashes to {}: lines were cut from the end of the log after that hash was recorded (or the hash is another log's, or of a file not given)",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            missing.join(", ")
        );
        if !json {
            bail!("{error}");
        }
        return audit_verify_failed(&error, verified, None, Some(&missing));
    }
    if json {
        say_json(&serde_json::json!({
            "intact": true,
            "records": records_total,
            "last_hash": after.map(|(last_hash, _)| last_hash),
            "files": verified,
        }));
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit verify --output json` for a log that does not verify: its object on stdout, the
/// error line on stderr, exit status 1. `missing` is None when the `--expect-hash` check
/// did not run (a break stopped the reading).
fn audit_verify_failed(
    error: &str,
    verified: Vec<serde_json::Value>,
    broken: Option<serde_json::Value>,
    missing: Option<&[String]>,
) -> Result<ExitCode> {
    say_json(&serde_json::json!({
        "intact": false,
        "error": error,
        "exit_status": 1,
        "files": verified,
        "broken": broken,
        "missing_expected_hashes": missing,
    }));
    to_stderr!("meshca: error: {error}");
    Ok(ExitCode::FAILURE)
}
