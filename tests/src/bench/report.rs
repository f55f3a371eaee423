//! The benchmark's outputs: a table on stdout, `report.json`, `report.md`
//! and one SVG plot per metric (each mode against N).

use std::{fmt::Write as _, path::Path};

use plotters::prelude::*;

use super::{Report, Row};

fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

/// The results as a Markdown table (also printed on stdout).
pub fn table(r: &Report) -> String {
    let mut t = String::from(
        "| mode | Services | conn/s (median, min–max) | × direct | RR p50 µs | RR p99 µs | cold program ms | one change ms (median, min–max) | agent RSS MiB | BPF maps MiB | iptables rules | agent CPU ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in &r.rows {
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} ({:.0}–{:.0}) | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} |",
            row.mode,
            row.services,
            row.conn_rate.median,
            row.conn_rate.min,
            row.conn_rate.max,
            fmt(row.conn_ratio, 3),
            row.rr_p50_us.median,
            row.rr_p99_us.median,
            fmt(row.cold_ms, 0),
            row.change_ms.as_ref().map_or("–".into(), |s| format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)),
            fmt(row.agent_rss_mib, 1),
            fmt(row.bpf_maps_mib, 1),
            row.iptables_rules.map_or("–".into(), |n| n.to_string()),
            fmt(row.agent_cpu_ms, 0),
        );
    }
    t
}

/// A metric plotted per mode against the number of Services (log scale).
struct Plot {
    file: &'static str,
    title: &'static str,
    y: &'static str,
    log_y: bool,
    value: fn(&Row) -> Option<f64>,
}

const PLOTS: [Plot; 7] = [
    Plot {
        file: "conn_rate.svg",
        title: "Connection setup rate",
        y: "connections/s",
        log_y: false,
        value: |r| Some(r.conn_rate.median),
    },
    Plot {
        file: "conn_ratio.svg",
        title: "Connection setup rate relative to direct",
        y: "× direct",
        log_y: false,
        value: |r| if r.mode == "direct" { Some(1.0) } else { r.conn_ratio },
    },
    Plot {
        file: "rr_p50.svg",
        title: "Request latency p50 (established connection)",
        y: "µs",
        log_y: false,
        value: |r| Some(r.rr_p50_us.median),
    },
    Plot {
        file: "rr_p99.svg",
        title: "Request latency p99 (established connection)",
        y: "µs",
        log_y: false,
        value: |r| Some(r.rr_p99_us.median),
    },
    Plot {
        file: "cold_program.svg",
        title: "Programming all Services from a cold start",
        y: "ms",
        log_y: true,
        value: |r| r.cold_ms,
    },
    Plot {
        file: "one_change.svg",
        title: "One changed EndpointSlice until traffic follows",
        y: "ms",
        log_y: true,
        value: |r| r.change_ms.as_ref().map(|s| s.median),
    },
    Plot { file: "agent_rss.svg", title: "Agent resident memory", y: "MiB", log_y: false, value: |r| r.agent_rss_mib },
];

fn color(mode: &str) -> RGBColor {
    match mode {
        "ebpf" => RGBColor(0x1f, 0x77, 0xb4),
        "iptables" => RGBColor(0xd6, 0x27, 0x28),
        _ => RGBColor(0x2c, 0xa0, 0x2c),
    }
}

fn plot(report: &Report, p: &Plot, out: &Path) -> anyhow::Result<()> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = ["direct", "ebpf", "iptables"]
        .iter()
        .map(|m| {
            let pts = report
                .rows
                .iter()
                .filter(|r| r.mode == *m)
                .filter_map(|r| Some(((r.services as f64).max(1.0), (p.value)(r)?)))
                .filter(|(_, y)| y.is_finite() && (!p.log_y || *y > 0.0))
                .collect();
            (*m, pts)
        })
        .filter(|(_, pts): &(&str, Vec<(f64, f64)>)| !pts.is_empty())
        .collect();
    let ys = series.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if lo > hi {
        return Ok(());
    }
    let max_n = report.rows.iter().map(|r| r.services).max().unwrap_or(1) as f64 * 2.0;
    let path = out.join(p.file);
    let root = SVGBackend::new(&path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = (p.title, ("sans-serif", 20));
    let mut builder = ChartBuilder::on(&root);
    builder.caption(caption.0, caption.1).margin(12).x_label_area_size(40).y_label_area_size(70);
    let x = (0.5f64..max_n).log_scale();
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart.configure_mesh().x_desc("Services installed").y_desc(p.y).draw()?;
            for (mode, pts) in &series {
                let c = color(mode);
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                    .label(*mode)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                chart.draw_series(pts.iter().map(|pt| Circle::new(*pt, 4, c.filled())))?;
            }
            chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
        }};
    }
    if p.log_y {
        draw!(builder.build_cartesian_2d(x, (lo / 2.0..hi * 2.0).log_scale())?);
    } else {
        draw!(builder.build_cartesian_2d(x, 0f64..hi * 1.15)?);
    }
    root.present()?;
    Ok(())
}

/// Writes report.json, report.md and the plots into `out`.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<()> {
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(report)?)?;
    for p in &PLOTS {
        plot(report, p, out)?;
    }
    std::fs::write(out.join("report.md"), markdown(report, ""))?;
    Ok(())
}

/// The report as Markdown; plots are linked relative to `plot_dir`.
pub fn markdown(r: &Report, plot_dir: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {}  \nCommand: `{}`  \niptables mode backend: {}  \nEach figure is the median of {} run(s) of {:.1} s ({} concurrent connections for the connection-rate load); spread is min–max.\n",
        r.machine, r.command, r.iptables_backend, r.repetitions, r.duration_s, r.threads
    );
    md.push_str(&table(r));
    let gain = r.generator.two_generators / r.generator.one_generator - 1.0;
    let verdict = if gain < 0.1 {
        "A second generator does not raise it, so the direct line measures the node, not the load generator."
            .to_string()
    } else {
        format!(
            "A second generator raises it by {:.0}%: with two cores shared by clients, servers and softirq work, the \
             direct figure is partly limited by the generator, so ratios within that margin are equal.",
            gain * 100.0
        )
    };
    let _ = writeln!(
        md,
        "\nGenerator check: direct connection rate with one generator {:.0}/s, with two at once {:.0}/s. {verdict}\n",
        r.generator.one_generator, r.generator.two_generators
    );
    md.push_str(&targets(r));
    for p in &PLOTS {
        let _ = writeln!(md, "![{}]({plot_dir}{})\n", p.title, p.file);
    }
    md
}

/// The targets the project set itself, and whether this run met them.
pub fn targets(r: &Report) -> String {
    let row = |mode: &str, n: usize| r.rows.iter().find(|x| x.mode == mode && x.services == n);
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    let mut out = String::from("Targets (reported whether met or not):\n\n");
    let ratios: Vec<String> = r
        .rows
        .iter()
        .filter(|x| x.mode == "ebpf")
        .map(|x| format!("{}: {}", x.services, fmt(x.conn_ratio, 3)))
        .collect();
    let all = r.rows.iter().filter(|x| x.mode == "ebpf").all(|x| x.conn_ratio.is_some_and(|v| v >= 0.95));
    let _ =
        writeln!(out, "- eBPF connection rate ≥ 0.95 × direct at every N ({}): {}", ratios.join(", "), verdict(all));
    for n in [10_000, 50_000] {
        if let (Some(ip), Some(eb)) = (row("iptables", n), row("ebpf", n)) {
            let below = ip.conn_rate.max < eb.conn_rate.min;
            let _ = writeln!(
                out,
                "- iptables visibly below eBPF at {n} Services ({:.0} vs {:.0} conn/s): {}",
                ip.conn_rate.median,
                eb.conn_rate.median,
                verdict(below)
            );
        }
    }
    if let Some(eb) = row("ebpf", 50_000) {
        let change = eb.change_ms.as_ref().map(|s| s.median);
        let ip_change = row("iptables", 50_000).and_then(|x| x.change_ms.as_ref().map(|s| s.median));
        let _ = writeln!(
            out,
            "- one change at 50,000 Services under 5 ms in eBPF ({} ms; iptables {} ms): {}",
            fmt(change, 1),
            fmt(ip_change, 0),
            verdict(change.is_some_and(|c| c < 5.0))
        );
        let _ = writeln!(
            out,
            "- cold programming of 50,000 Services under 2 s in eBPF ({} ms): {}",
            fmt(eb.cold_ms, 0),
            verdict(eb.cold_ms.is_some_and(|c| c < 2000.0))
        );
    }
    out.push('\n');
    out
}
