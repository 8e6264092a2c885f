//! One recipe, several boards: `recipes/gateway.toml` builds for the
//! x86-64 and the arm64 QEMU boards with nothing but `--board`, each image
//! with its board's kernel, bootloader binary, root partition type and
//! device programs; a recipe's own kernel overrides the board's only when
//! it is of the board's architecture. Needs ci/setup.sh's kernels and the
//! device programs of both targets (ci/test.sh builds them first).

mod common;

use basalt::plan::{self, PlanOptions};
use basalt_bundle::layout::{Arch, ROOT_ARM64_TYPE, ROOT_X86_64_TYPE};
use common::{extract, ok, root, SDE};

fn options(board: &str) -> PlanOptions {
    PlanOptions {
        board: Some(board.to_string()),
        source_date_epoch: SDE,
        cache_dir: plan::default_cache_dir(),
        ..Default::default()
    }
}

/// The machine type of an ELF file (`e_machine`).
fn elf_machine(bytes: &[u8]) -> u16 {
    assert_eq!(&bytes[..4], b"\x7fELF");
    u16::from_le_bytes([bytes[18], bytes[19]])
}

#[test]
fn the_gateway_builds_for_both_qemu_boards_from_the_same_recipe() {
    let recipe = root().join("recipes/gateway.toml");
    for (board, arch, release, root_type, efi, machine) in [
        ("qemu-x86_64", Arch::X86_64, "cloud-amd64", ROOT_X86_64_TYPE, "BOOTX64.EFI", 62),
        ("qemu-aarch64", Arch::Aarch64, "cloud-arm64", ROOT_ARM64_TYPE, "BOOTAA64.EFI", 183),
    ] {
        let plan = plan::resolve(&recipe, &options(board)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plan.board.arch, arch);
        assert!(plan.kernel.release.ends_with(release), "{board}: {}", plan.kernel.release);
        assert_eq!(elf_machine(&std::fs::read(&plan.init_binary).unwrap()), machine, "{board}");

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let r =
            basalt::build::build(&plan, None, &out, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.board.as_str(), r.arch.as_str()), (board, arch.name()));
        let disk = out.join("disk.img");
        let i = ok(std::process::Command::new("sgdisk").args(["-i", "2"]).arg(&disk));
        assert!(i.to_lowercase().contains(&root_type.to_string()), "{board}: {i}");
        // The ESP boots the board's systemd-boot and a kernel UEFI loads.
        let esp_part = r.partitions.iter().find(|p| p.label == "esp").unwrap();
        let esp = dir.path().join("esp.img");
        extract(&disk, esp_part.offset, esp_part.size, &esp);
        let mtype = |path: &str| {
            let o = std::process::Command::new("mtype")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&esp)
                .arg(format!("::{path}"))
                .output()
                .unwrap();
            assert!(o.status.success(), "{board}: no {path} on the ESP");
            o.stdout
        };
        assert_eq!(basalt::kimage::arch(&mtype(&format!("/EFI/BOOT/{efi}"))), Some(arch));
        assert_eq!(basalt::kimage::arch(&mtype("/a/vmlinuz")), Some(arch), "{board}");
    }
}

#[test]
fn a_recipe_kernel_of_another_architecture_is_refused() {
    // recipes/minimal.toml names the amd64 kernel itself.
    let e = plan::resolve(&root().join("recipes/minimal.toml"), &options("qemu-aarch64"))
        .unwrap_err()
        .to_string();
    for want in ["minimal.toml", "an x86_64 kernel", "board `qemu-aarch64` is aarch64"] {
        assert!(e.contains(want), "error lacks {want:?}:\n{e}");
    }
}

#[test]
fn a_board_without_a_kernel_needs_one_from_the_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let board = std::fs::read_to_string(root().join("boards/qemu-x86_64.toml")).unwrap();
    let start = board.find("[kernel]").unwrap();
    let end = board.find("[firmware]").unwrap();
    let board = format!("{}{}", &board[..start], &board[end..]);
    let path = dir.path().join("nokernel.toml");
    std::fs::write(&path, board).unwrap();
    let e = plan::resolve(&root().join("recipes/gateway.toml"), &options(path.to_str().unwrap()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("names no kernel, and the recipe's [kernel] names none"), "{e}");
    assert!(e.contains("nokernel.toml"), "{e}");
    // The recipe's kernel is enough.
    plan::resolve(&root().join("recipes/minimal.toml"), &options(path.to_str().unwrap()))
        .unwrap_or_else(|e| panic!("{e}"));
}
