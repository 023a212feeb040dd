//! `arw-cli state runtime-matrix`: every node's runtimes, one row each.

use std::fmt::Write as _;

use arw_p2p::runtimes::RuntimeMatrix;

use super::cluster::truncate;

const WIDTHS: [usize; 5] = [20, 16, 9, 7, 28];

/// The table: node, runtime, health, faults of the budget, kinds, then the status line.
pub fn render(matrix: &RuntimeMatrix) -> String {
    if matrix.items.is_empty() {
        return "no runtimes\n".into();
    }
    let mut out = String::new();
    let mut row = |cells: [String; 6]| {
        for (cell, width) in cells.iter().zip(WIDTHS) {
            let _ = write!(out, "{:<width$} ", truncate(cell, width));
        }
        let _ = writeln!(out, "{}", cells[5]);
    };
    row(["Node", "Runtime", "Health", "Faults", "Kinds", "Status"].map(String::from));
    for (node, entry) in &matrix.items {
        for r in &entry.runtimes {
            let rt = &r.runtime;
            row([
                node.clone(),
                rt.id.clone(),
                rt.health.as_str().to_owned(),
                format!("{}/{}", rt.failures, rt.budget),
                rt.kinds.join(","),
                r.status.clone(),
            ]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use arw_p2p::{
        jobs::{RuntimeBudget, RuntimeDecl, Runtimes},
        runtimes::RuntimeMatrixEntry,
    };

    #[test]
    fn one_row_per_runtime_with_its_status() {
        let decls = vec![
            RuntimeDecl { id: "builtin".into(), kinds: vec!["echo".into(), "sleep".into()] },
            RuntimeDecl { id: "exec:ocr".into(), kinds: vec!["ocr".into()] },
        ];
        let mut runtimes = Runtimes::new(decls, RuntimeBudget::default());
        for t in 0..5 {
            runtimes.finished("ocr", Some("exit status 3"), 1_000 + t);
        }
        let entry = RuntimeMatrixEntry::of("worker-1", &runtimes.statuses(), 2_000, 2_000);
        let matrix = RuntimeMatrix {
            items: [("worker-1".to_owned(), entry)].into_iter().collect(),
            ttl_seconds: 360,
        };
        let text = render(&matrix);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[1]
                .starts_with("worker-1             builtin          ready     0/5     echo,sleep")
        );
        assert!(lines[2].contains("exec:ocr         down      0/5"), "{text}");
        assert!(lines[2].ends_with("quarantined, 30 s left (last: exit status 3)"), "{text}");
        let empty = RuntimeMatrix { items: Default::default(), ttl_seconds: 360 };
        assert_eq!(render(&empty), "no runtimes\n");
    }
}
