//! `--plot FILE.svg`: the run over time, one point a second — probe stanzas sent and
//! deliveries received per second (from the monitor's ticks of the run counters) above,
//! p50 and p99 end-to-end latency of the deliveries that arrived in each second (from
//! the readers' [`Timeline`](crate::stats::Timeline)) below.
//!
//! It only turns finished series into a file; it never measures anything itself.

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

use crate::monitor::Tick;
use crate::stats::SecondLatency;

/// One second of the plot: rates over the second that ended at `secs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePoint {
    pub secs: f64,
    pub sent_per_sec: f64,
    pub received_per_sec: f64,
}

/// Per-second rates from consecutive ticks of the cumulative counters. A last partial
/// interval shorter than a quarter second is left out: its rate is mostly noise.
pub fn rates(ticks: &[Tick]) -> Vec<RatePoint> {
    ticks
        .windows(2)
        .filter(|w| w[1].secs - w[0].secs >= 0.25)
        .map(|w| {
            let dt = w[1].secs - w[0].secs;
            RatePoint {
                secs: w[1].secs,
                sent_per_sec: w[1].sent.saturating_sub(w[0].sent) as f64 / dt,
                received_per_sec: w[1].received.saturating_sub(w[0].received) as f64 / dt,
            }
        })
        .collect()
}

const SENT: RGBColor = RGBColor(31, 119, 180);
const RECEIVED: RGBColor = RGBColor(44, 160, 44);
const P50: RGBColor = RGBColor(31, 119, 180);
const P99: RGBColor = RGBColor(214, 39, 40);

/// One line of a panel: its legend, colour and points.
type Line = (&'static str, RGBColor, Vec<(f64, f64)>);

/// Writes the SVG to `path`. `title` names the run (scenario and parameters).
pub fn write_svg(
    path: &Path,
    title: &str,
    ticks: &[Tick],
    latency: &[SecondLatency],
) -> anyhow::Result<()> {
    let rates = rates(ticks);
    // Seconds with no delivery have no latency to plot; a second's point is its middle.
    let latency: Vec<_> = latency.iter().filter(|s| s.count > 0).collect();
    let ms = |pick: fn(&SecondLatency) -> u64| -> Vec<(f64, f64)> {
        latency
            .iter()
            .map(|s| (s.second as f64 + 0.5, pick(s) as f64 / 1000.0))
            .collect()
    };
    let rate_lines: [Line; 2] = [
        (
            "sent/s",
            SENT,
            rates.iter().map(|r| (r.secs, r.sent_per_sec)).collect(),
        ),
        (
            "received/s",
            RECEIVED,
            rates.iter().map(|r| (r.secs, r.received_per_sec)).collect(),
        ),
    ];
    let latency_lines: [Line; 2] = [
        ("p50", P50, ms(|s| s.p50_us)),
        ("p99", P99, ms(|s| s.p99_us)),
    ];
    // Both panels share the time axis.
    let end = rate_lines
        .iter()
        .chain(&latency_lines)
        .flat_map(|(_, _, points)| points.iter().map(|p| p.0))
        .fold(1.0, f64::max);

    let root = SVGBackend::new(path, (1000, 720)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 20))?;
        let (upper, lower) = root.split_vertically(340);
        panel(
            &upper,
            "stanzas sent and deliveries received per second",
            "per second",
            end,
            &rate_lines,
        )?;
        panel(
            &lower,
            "end-to-end latency of each second's deliveries",
            "ms",
            end,
            &latency_lines,
        )?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("plot {}", path.display()))
}

/// One chart of `lines` against seconds `0..end`, with a legend.
fn panel<'a>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    end: f64,
    lines: &[Line],
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let top = lines
        .iter()
        .flat_map(|(_, _, points)| points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .caption(caption, ("sans-serif", 16))
        .build_cartesian_2d(0.0..end, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(y_desc)
        .draw()?;
    for (name, color, points) in lines {
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_from_cumulative_ticks() {
        let t = |secs, sent, received| Tick {
            secs,
            sent,
            received,
        };
        let r = rates(&[
            t(1.0, 0, 0),
            t(2.0, 100, 90),
            t(2.5, 150, 150),
            t(2.5, 150, 150),
        ]);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].secs, r[0].sent_per_sec, r[0].received_per_sec),
            (2.0, 100.0, 90.0)
        );
        assert_eq!((r[1].sent_per_sec, r[1].received_per_sec), (100.0, 120.0));
        assert!(rates(&[]).is_empty());
    }
}
