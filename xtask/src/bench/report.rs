//! What a benchmark run produces: Markdown tables on stdout, the figures
//! as JSON, and a PNG chart of the ratios.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

/// One row of a table: a mode and its figures, in column order.
#[derive(Clone, Debug)]
pub struct Row {
    /// What was measured (e.g. "ebpf").
    pub mode: String,
    /// The figures, one per column.
    pub cells: Vec<f64>,
}

/// One comparison: rows of modes, columns of figures, and which column the
/// chart shows as a ratio to the first row.
#[derive(Clone, Debug)]
pub struct Table {
    /// Short id (JSON key).
    pub id: String,
    /// Heading.
    pub title: String,
    /// Column headings, with units.
    pub columns: Vec<String>,
    /// The rows; the first is the baseline of ratios.
    pub rows: Vec<Row>,
    /// Column charted as a ratio to the first row, with the chart's label.
    pub chart: Option<(usize, String)>,
    /// A note printed under the table.
    pub note: String,
}

impl Table {
    /// The ratio of `row`'s figure in `column` to the first row's.
    pub fn ratio(&self, row: usize, column: usize) -> f64 {
        let base = self
            .rows
            .first()
            .and_then(|r| r.cells.get(column))
            .copied()
            .unwrap_or(f64::NAN);
        self.rows
            .get(row)
            .and_then(|r| r.cells.get(column))
            .map_or(f64::NAN, |v| v / base)
    }

    /// The table as Markdown, with a ratio column for the charted figure.
    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n| mode |", self.title);
        for c in &self.columns {
            out.push_str(&format!(" {c} |"));
        }
        if let Some((_, label)) = &self.chart {
            out.push_str(&format!(" {label} |"));
        }
        out.push_str("\n|---|");
        for _ in &self.columns {
            out.push_str("---:|");
        }
        if self.chart.is_some() {
            out.push_str("---:|");
        }
        out.push('\n');
        for (i, row) in self.rows.iter().enumerate() {
            out.push_str(&format!("| {} |", row.mode));
            for v in &row.cells {
                out.push_str(&format!(" {} |", figure(*v)));
            }
            if let Some((column, _)) = &self.chart {
                out.push_str(&format!(" {:.3} |", self.ratio(i, *column)));
            }
            out.push('\n');
        }
        if !self.note.is_empty() {
            out.push_str(&format!("\n{}\n", self.note));
        }
        out
    }

    /// The table as JSON.
    pub fn json(&self) -> Value {
        json!({
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows.iter().enumerate().map(|(i, r)| json!({
                "mode": r.mode,
                "cells": r.cells,
                "ratio": self.chart.as_ref().map(|(c, _)| self.ratio(i, *c)),
            })).collect::<Vec<_>>(),
            "ratio_of": self.chart.as_ref().map(|(c, label)| json!({"column": self.columns.get(*c), "label": label})),
            "note": self.note,
        })
    }
}

/// A figure with as many decimals as its size deserves.
fn figure(v: f64) -> String {
    if !v.is_finite() {
        "–".to_owned()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The `q` quantile (0..1) of `values` (sorted in place).
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values.get(index).copied().unwrap_or(f64::NAN)
}

/// The median of `values`.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    quantile(&mut v, 0.5)
}

/// Where the chart's font comes from (Debian's fonts-dejavu-core, which
/// `cargo xtask setup` installs).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws one horizontal bar panel per charted table: each mode's ratio to
/// the table's first row, with a line at 1.0.
pub fn chart(tables: &[Table], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read(FONT).with_context(|| format!("reading the chart font {FONT}"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("the chart font {FONT} is not a usable TTF"))?;
    let charted: Vec<&Table> = tables.iter().filter(|t| t.chart.is_some()).collect();
    if charted.is_empty() {
        return Ok(());
    }
    let panel_height = 70 + 34 * charted.iter().map(|t| t.rows.len()).max().unwrap_or(1) as u32;
    let root =
        BitMapBackend::new(path, (1000, panel_height * charted.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((charted.len(), 1));
    for (table, panel) in charted.iter().zip(panels.iter()) {
        let Some((column, label)) = &table.chart else {
            continue;
        };
        let ratios: Vec<f64> = (0..table.rows.len())
            .map(|i| table.ratio(i, *column))
            .collect();
        let max = ratios
            .iter()
            .copied()
            .filter(|r| r.is_finite())
            .fold(1.0f64, f64::max)
            * 1.15;
        let n = table.rows.len();
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{} — {label}", table.title), ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(40)
            .y_label_area_size(230)
            .build_cartesian_2d(0f64..max, 0f64..n as f64)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let modes: Vec<String> = table.rows.iter().map(|r| r.mode.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n * 2 + 1)
            .y_label_formatter(&|y| {
                let i = y.floor() as usize;
                if (y - y.floor() - 0.5).abs() < 0.01 && i < modes.len() {
                    modes[n - 1 - i].clone()
                } else {
                    String::new()
                }
            })
            .x_desc("ratio to the first row")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        chart
            .draw_series(ratios.iter().enumerate().map(|(i, r)| {
                let y = (n - 1 - i) as f64;
                let value = if r.is_finite() { *r } else { 0.0 };
                Rectangle::new(
                    [(0.0, y + 0.2), (value, y + 0.8)],
                    colors[i % colors.len()].mix(0.7).filled(),
                )
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(ratios.iter().enumerate().map(|(i, r)| {
                let y = (n - 1 - i) as f64 + 0.5;
                Text::new(
                    format!("{r:.3}"),
                    ((if r.is_finite() { *r } else { 0.0 }) + max * 0.01, y),
                    ("sans-serif", 14),
                )
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(1.0, 0.0), (1.0, n as f64)],
                BLACK,
            )))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
