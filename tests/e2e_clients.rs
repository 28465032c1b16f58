//! End-to-end with heavier real clients: fio (ioengine=nbd, verify=crc32c), nbdcopy and
//! qemu-img (convert, compare, info), and many clients at once on different branches and
//! volumes.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use serde_json::Value;
use support::{
    assert_pattern, assert_patterns, assert_same_bytes, pseudo_random_bytes, qio_write,
    require_nbd_tools, require_tool, run, write_pattern, CmdOut, Grove, KIB, MIB,
};

const FIO_TIMEOUT: Duration = Duration::from_secs(240);

fn fio(work_dir: &Path, uri: &str, extra: &[&str]) -> CmdOut {
    let mut command = Command::new("fio");
    command
        .current_dir(work_dir)
        .arg("--name=grove-verify")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--randseed=4242",
            "--verify_state_save=0",
            "--group_reporting",
        ])
        .args(extra);
    run(&mut command, FIO_TIMEOUT)
}

fn assert_fio_ok(out: &CmdOut, what: &str) {
    let text = out.combined();
    assert!(
        out.success() && text.contains("err= 0") && !text.contains("verify: bad"),
        "fio {what} failed\n{}",
        out.report()
    );
}

#[test]
fn fio_random_writes_verify_crc32c() {
    require_nbd_tools();
    require_tool("fio", "fio");
    let help = run(
        Command::new("fio").arg("--enghelp"),
        Duration::from_secs(30),
    );
    assert!(
        help.stdout.lines().any(|line| line.trim() == "nbd"),
        "this fio has no nbd ioengine\n{}",
        help.report()
    );
    let mut grove = Grove::start();
    grove.create_volume("fio", "64MiB");
    grove.create_volume("empty", "64MiB");
    let work = grove.root().to_path_buf();

    // Two jobs, each on its own connection and its own 16 MiB, random 4 KiB writes at queue
    // depth 16, then fio reads everything back and checks the crc32c in each block.
    let out = fio(&work, &grove.unix_uri("fio"), &["--do_verify=1"]);
    assert_fio_ok(&out, "randwrite + verify");

    // A separate verification pass on new connections (over TCP this time).
    let out = fio(&work, &grove.tcp_uri("fio"), &["--verify_only=1"]);
    assert_fio_ok(&out, "verify-only pass");

    // The same data is in a commit of the volume.
    let commit = grove.commit("fio", "after fio");
    let out = fio(
        &work,
        &grove.unix_uri(&format!("fio@{commit}")),
        &["--verify_only=1"],
    );
    assert_fio_ok(&out, "verify-only pass on the commit");

    // Control: the same verification on a volume fio never wrote must fail, which proves
    // the passes above really checked data.
    let out = fio(&work, &grove.unix_uri("empty"), &["--verify_only=1"]);
    assert!(
        !out.success(),
        "fio verification of an unwritten volume should fail\n{}",
        out.report()
    );
    grove.assert_healthy();
}

/// fio with `job` (rw, bs, iodepth, seed), verified by crc32c, on the first 32 MiB of `uri`.
fn fio_large(work_dir: &Path, uri: &str, job: [&str; 4], extra: &[&str]) -> CmdOut {
    let [rw, bs, iodepth, seed] = job;
    let mut command = Command::new("fio");
    command
        .current_dir(work_dir)
        .arg("--name=grove-large")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={iodepth}"))
        .arg(format!("--randseed={seed}"))
        .args(["--size=32M", "--verify=crc32c", "--verify_state_save=0"])
        .args(extra);
    run(&mut command, FIO_TIMEOUT)
}

#[test]
fn fio_large_writes_verify_crc32c() {
    require_nbd_tools();
    require_tool("fio", "fio");
    let mut grove = Grove::start();
    grove.create_volume("big", "64MiB");
    let work = grove.root().to_path_buf();

    // 1 MiB sequential writes of new blocks (large enough to go past the page cache where
    // the file system allows it), read back by fio on the same connection.
    let sequential = ["write", "1M", "8", "7"];
    let out = fio_large(
        &work,
        &grove.unix_uri("big"),
        sequential,
        &["--do_verify=1"],
    );
    assert_fio_ok(&out, "1M sequential writes + verify");
    let commit = grove.commit("big", "sequential");

    // 256 KiB random writes over blocks shared with the commit: copied on write, to new
    // blocks again; the commit keeps the sequential pass.
    let random = ["randwrite", "256k", "4", "8"];
    let out = fio_large(&work, &grove.unix_uri("big"), random, &["--do_verify=1"]);
    assert_fio_ok(&out, "256k random writes + verify");
    // Another random pass, over blocks the head owns now: written in place.
    let in_place = ["randwrite", "256k", "4", "9"];
    let out = fio_large(&work, &grove.unix_uri("big"), in_place, &["--do_verify=1"]);
    assert_fio_ok(&out, "256k random writes in place + verify");
    let at_commit = grove.unix_uri(&format!("big@{commit}"));
    let out = fio_large(&work, &at_commit, sequential, &["--verify_only=1"]);
    assert_fio_ok(&out, "verify-only pass on the commit");

    // After a restart, from the disk alone.
    assert!(grove.terminate().success(), "{}", grove.log_text());
    grove.spawn();
    let out = fio_large(&work, &grove.tcp_uri("big"), in_place, &["--verify_only=1"]);
    assert_fio_ok(&out, "verify-only pass after a restart");
    // Control: the commit does not hold the random passes.
    let at_commit = grove.unix_uri(&format!("big@{commit}"));
    let out = fio_large(&work, &at_commit, in_place, &["--verify_only=1"]);
    assert!(
        !out.success(),
        "the commit should not verify as the later random passes\n{}",
        out.report()
    );
    grove.assert_healthy();
}

fn qemu_img(args: &[&str]) -> CmdOut {
    run(Command::new("qemu-img").args(args), support::TOOL_TIMEOUT)
}

fn nbdcopy(source: &str, destination: &str) {
    let out = run(
        Command::new("nbdcopy").args(["--flush", source, destination]),
        support::TOOL_TIMEOUT,
    );
    out.assert_success();
}

/// 16 MiB of mixed content: random data, a zero run, a constant run, random again.
fn mixed_image(seed: u64) -> Vec<u8> {
    let mut image = pseudo_random_bytes((16 * MIB) as usize, seed);
    image[(4 * MIB) as usize..(8 * MIB) as usize].fill(0);
    image[(12 * MIB) as usize..(15 * MIB) as usize].fill(0xab);
    image
}

#[test]
fn nbdcopy_and_qemu_img_round_trip() {
    require_nbd_tools();
    let mut grove = Grove::start();
    grove.create_volume("cp", "16MiB");
    grove.create_volume("cp2", "16MiB");
    let dir = grove.root().to_path_buf();
    let source = dir.join("in.img");
    let image = mixed_image(7);
    std::fs::write(&source, &image).expect("write source image");
    let source_arg = source.to_str().expect("utf-8 path");
    let uri = grove.unix_uri("cp");

    let info = qemu_img(&["info", "--output=json", &uri]);
    info.assert_success();
    let info: Value = serde_json::from_str(&info.stdout).expect("qemu-img info json");
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(16 * MIB),
        "qemu-img info virtual size: {info}"
    );

    // File -> volume -> file with nbdcopy.
    nbdcopy(source_arg, &uri);
    let out_path = dir.join("out.img");
    nbdcopy(&uri, out_path.to_str().expect("utf-8 path"));
    let copied = std::fs::read(&out_path).expect("read nbdcopy output");
    assert_same_bytes(&image, &copied, "nbdcopy round trip");

    // Volume -> file with qemu-img convert, checked with qemu-img compare.
    let converted = dir.join("converted.img");
    let converted_arg = converted.to_str().expect("utf-8 path");
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &uri, converted_arg]).assert_success();
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        source_arg,
        converted_arg,
    ])
    .assert_success();
    assert_same_bytes(
        &image,
        &std::fs::read(&converted).expect("read converted"),
        "qemu-img convert",
    );
    // qemu-img compare straight against the export over TCP.
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        source_arg,
        &grove.tcp_uri("cp"),
    ])
    .assert_success();

    // Commit, then overwrite the head with other content through qemu-img convert -n.
    let commit = grove.commit("cp", "image one");
    let other_path = dir.join("other.img");
    let other = mixed_image(8);
    std::fs::write(&other_path, &other).expect("write second image");
    let other_arg = other_path.to_str().expect("utf-8 path");
    qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", other_arg, &uri]).assert_success();
    qemu_img(&["compare", "-f", "raw", "-F", "raw", other_arg, &uri]).assert_success();
    let commit_uri = grove.unix_uri(&format!("cp@{commit}"));
    qemu_img(&["compare", "-f", "raw", "-F", "raw", source_arg, &commit_uri]).assert_success();
    // Control: the head and the commit now differ, and qemu-img sees it (exit status 1).
    let differ = qemu_img(&["compare", "-f", "raw", "-F", "raw", &commit_uri, &uri]);
    assert_eq!(
        differ.status.code(),
        Some(1),
        "qemu-img compare must report that head and commit differ\n{}",
        differ.report()
    );

    // Export to export: the commit copied into another volume with nbdcopy.
    nbdcopy(&commit_uri, &grove.unix_uri("cp2"));
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        source_arg,
        &grove.unix_uri("cp2"),
    ])
    .assert_success();
    grove.assert_healthy();
}

fn expected_image(base: u8, pattern: u8) -> Vec<u8> {
    let mut image = vec![0u8; (16 * MIB) as usize];
    image[..(8 * MIB) as usize].fill(base);
    image[MIB as usize..(5 * MIB) as usize].fill(pattern);
    image[(10 * MIB) as usize..(11 * MIB) as usize].fill(pattern);
    image
}

#[test]
fn many_clients_on_branches_and_volumes_at_once() {
    require_nbd_tools();
    let mut grove = Grove::start();
    let mut exports: Vec<(String, u8)> = Vec::new();
    let mut commits = Vec::new();
    for (volume, base) in [("ca", 0x01u8), ("cb", 0x02u8)] {
        grove.create_volume(volume, "16MiB");
        write_pattern(&grove.unix_uri(volume), base, 0, 8 * MIB);
        let commit = grove.commit(volume, "base");
        for branch in ["b1", "b2", "b3"] {
            grove.cli_ok(&[
                "branch",
                "create",
                volume,
                branch,
                "--from",
                &format!("{volume}@{commit}"),
            ]);
            exports.push((format!("{volume}@{branch}"), base));
        }
        exports.push((volume.to_string(), base));
        commits.push((volume, commit, base));
    }
    assert_eq!(exports.len(), 8);

    // Eight clients at once, each on its own branch, writing the same offsets with its own
    // pattern, then checking them, then copying the whole export out with nbdcopy.
    let barrier = Barrier::new(exports.len());
    let dir = grove.root().to_path_buf();
    thread::scope(|scope| {
        for (index, (export, base)) in exports.iter().enumerate() {
            let grove = &grove;
            let barrier = &barrier;
            let dir = &dir;
            scope.spawn(move || {
                let pattern = 0x10 + index as u8;
                let uri = if index % 2 == 0 {
                    grove.tcp_uri(export)
                } else {
                    grove.unix_uri(export)
                };
                barrier.wait();
                qio_write(
                    &uri,
                    &[
                        &format!("write -P 0x{pattern:02x} {} {}", MIB, 4 * MIB),
                        &format!("write -P 0x{pattern:02x} {} {}", 10 * MIB, MIB),
                    ],
                );
                assert_patterns(
                    &uri,
                    &[
                        (*base, 0, MIB),
                        (pattern, MIB, 4 * MIB),
                        (*base, 5 * MIB, 3 * MIB),
                        (0, 8 * MIB, 2 * MIB),
                        (pattern, 10 * MIB, MIB),
                        (0, 11 * MIB, 5 * MIB),
                    ],
                );
                let out = dir.join(format!("copy-{index}.img"));
                let out_arg = out.to_str().expect("utf-8 path");
                let copy = run(
                    Command::new("nbdcopy").args([uri.as_str(), out_arg]),
                    support::TOOL_TIMEOUT,
                );
                copy.assert_success();
                let copied = std::fs::read(&out).expect("read copy");
                assert_same_bytes(
                    &expected_image(*base, pattern),
                    &copied,
                    &format!("export {export} copied by nbdcopy"),
                );
                let _ = std::fs::remove_file(&out);
            });
        }
    });

    // The commits the branches came from are unchanged.
    for (volume, commit, base) in &commits {
        assert_patterns(
            &grove.unix_uri(&format!("{volume}@{commit}")),
            &[(*base, 0, 8 * MIB), (0, 8 * MIB, 8 * MIB)],
        );
    }

    // Several connections writing disjoint ranges of one export at once.
    grove.create_volume("shared", "16MiB");
    let barrier = Barrier::new(6);
    thread::scope(|scope| {
        for index in 0..6u64 {
            let grove = &grove;
            let barrier = &barrier;
            scope.spawn(move || {
                let pattern = 0x80 + index as u8;
                let uri = grove.unix_uri("shared");
                barrier.wait();
                // Interleaved 64 KiB stripes, so the six writers' ranges alternate across 6 MiB.
                let commands: Vec<String> = (0..16u64)
                    .map(|stripe| {
                        let offset = (stripe * 6 + index) * 64 * KIB;
                        format!("write -P 0x{pattern:02x} {offset} {}", 64 * KIB)
                    })
                    .collect();
                let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
                qio_write(&uri, &commands);
            });
        }
    });
    let uri = grove.unix_uri("shared");
    let ranges: Vec<(u8, u64, u64)> = (0..16u64)
        .flat_map(|stripe| {
            (0..6u64).map(move |index| {
                (
                    0x80 + index as u8,
                    (stripe * 6 + index) * 64 * KIB,
                    64 * KIB,
                )
            })
        })
        .collect();
    assert_patterns(&uri, &ranges);
    assert_pattern(&uri, 0, 96 * 64 * KIB, 16 * MIB - 96 * 64 * KIB);
    grove.assert_healthy();
}
