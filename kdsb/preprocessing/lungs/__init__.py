"""Lung segmentation of a CT volume in HU, and the lung bounding box.

Input volumes are canonical HU (z, y, x): axis 0 inferior → superior, axis 1 anterior →
posterior (a patient table lies at large axis-1 indices), axis 2 right → left; outside-FOV padding
already reads -1000 HU.

`segment_lungs` works in two resolutions so that a 512×512×200 scan takes about a second:

1. A coarse copy (block means of about `COARSE_SPACING_MM`) carries all the morphology. Air is below
   `AIR_THRESHOLD_HU`. The body is the largest non-air component with its holes filled slice by
   slice, so air outside it (also air split off by the table or outside a padded circular field of
   view) is discarded. Where the image's edge or a circular field of view cuts through the chest
   wall, the lung behind it is open to the air outside in those slices: such pockets (bounded by the
   field of view where padding marks it, else by the body's convex hull) join the body where they
   are parenchyma lying on the lung of the next slice, followed slice by slice from where the cut
   spares the lung (`body.cut_open_lungs`); the body's centre then gives way to the gap between the
   lungs as the midline. The trachea is a dark round blob near the midline in the top slices (the
   highest whose airway runs `TRACHEA_MIN_LENGTH_MM` down: a blob of pharynx air above it ends
   sooner); it and the main bronchi are region-grown from there, slice by slice: the blob of
   lumen-dark air (below `AIRWAY_LOOSE_HU`, so a ground-glass lesion beside the trachea stays out)
   touching the previous slice's airway while it stays a lumen (its median darker than
   `AIRWAY_LUMEN_MEDIAN_HU`: dense parenchyma of about -810 HU is mostly that loose air too), the
   stricter `AIRWAY_THRESHOLD_HU` air within it where it joins the lung, stopping where even that
   area jumps (a leak into the lung), and removed. Air components that are parenchyma (median above
   the airway threshold: gas is darker than lung), large, and reach the upper half of the lungs are
   kept (bowel gas is not). Each side (right / left of the lungs' midline, halfway between their
   outermost voxels: the body's centre moves where the field of view cuts off an arm; the trachea's
   centre where a cut lung's outermost voxels are the cut, and no apex rule) is then filled on its
   own, so the two lungs never merge across the mediastinum: a closing with a ball of
   `CLOSING_RADIUS_MM` (two Euclidean distance transforms: an exact ball at little cost, unlike
   binary closing with a huge structuring element) and 3D hole filling take in vessels and nodules
   (beyond the split the ball sees empty space, except on the rows where the lungs come within
   `JUNCTION_GAP_FRACTION` of their span of each other across it, the anterior junction or the
   posterior one behind the oesophagus: there the lung goes on beyond the split, so a nodule lying
   across the junction is closed in from both sides); tissue enclosed between the lung and the chest
   wall inside the slice-wise convex hull of the lungs takes in juxtapleural nodules and tumours,
   which a ball rolling from the wall side would bite into; a nodule found so reaches on out to the
   chest wall's depth under the skin, past the hull's chords where the wall curves outwards. Tumours
   up to about 35 mm radius leave a dent in the lung that no 15 mm ball fills, so each side is also
   closed with a ball of `ENVELOPE_RADIUS_MM` (edge-padded so the closing never fills out to the
   scan's border) and everything that envelope adds is taken in, except bone (coarse HU above
   `BONE_HU`) and air the lung selection rejected. A tumour that caps a lung's apex leaves no dent
   at all: within `APEX_ZONE_MM` of the top, thick non-bone tissue inside the other lung's mirror
   image, as deep under the skin as this apex, is taken in (`apex_completion`; not where the scan's
   top slice cuts the lungs near their widest). The envelope's ball still rolls a few millimetres
   into a large mass's dent, so tissue within a rim of a thick mass the filling took in is added too
   (`lesion_rim`, `MASS_RIMS_MM`): the mass's hidden edge against the wall, spine or diaphragm. A
   mass of about 30 mm radius or more that fills a lung out to where the chest wall curves away (a
   costophrenic recess, behind the sternum) leaves its outer third beyond those rims, between the
   mask's concave boundary and the lungs' hull: tissue there, near the mass's core and lying
   outwards of it (shallower under the skin), joins the mask where it touches both the mask and the
   hull's edge, and reaches on out to the wall (`mass_pockets`). Such a large mass that meets
   tissue of its own density far from the lung's edge (in a concave mediastinal dent, down in the
   liver dome) keeps that part beyond the rims and pockets too: its surface facing the lung is a
   cap of a sphere, and where a ball fits it (`mass_balls`: radius ≤ `BALL_MAX_RADIUS_MM`, misfit
   ≤ `BALL_MISFIT_MM`), the tissue inside that ball and the lungs' hull joins the mask. A
   ground-glass mass that bulges
   into the mediastinum past the envelope (beyond the rims' reach, inwards of its core, where no
   pocket lies) keeps that part as thick ground glass of which the mask already holds most
   (`hazy_masses`: ground glass surviving an opening with a ball of radius `HAZY_CORE_MM`; its
   blocks on the mask's boundary keep only their lung and ground glass at full resolution). Air the
   lung selection rejected counts as gas (bowel, airways: never taken in, nor the tissue voxels
   beside it) only where its median is darker than `GROUND_GLASS_MIN_HU`; hazier pockets are a
   lesion's ground glass cut off from the lung by its solid part, and join the lungs they touch
   (`rejected_gas`).
2. Back on the source grid, coarse voxels well inside the mask, or added by the filling, are
   taken whole (only their tissue voxels beside rejected air); coarse voxels on the boundary keep
   only their full-resolution voxels of lung or ground glass (below `GROUND_GLASS_MAX_HU`), so
   the lung surface is as sharp as the source image, tissue that protrudes into the lung, with
   lung air on both sides within `SMALL_NODULE_MM` (`protruding_tissue`: a nodule too small for the
   coarse grid), and the tissue voxels within `FRINGE_VOXELS` of a solid core the filling took
   in or one protruding into the lung (a nodule's edge where it meets the chest wall, a small
   nodule's base in a corner of the wall) (`full_resolution_mask`). That fringe grows from the
   cores after one erosion, which removes a 3 mm nodule's core (three voxels thick) whole; such a
   core still gives the boundary tissue touching it where it is a small compact blob, not a
   vessel's strand or sheet (`small_nodules`: at most `SMALL_CORE_MAX_MM3`, 4-10 mm along each
   axis, filling 0.4 of its box): the base of a 3 mm nodule against the wall.

Modules (`segment.segment_lungs_in_box` runs the rules in order): `morphology` (the coarse grid,
block means, closings with Euclidean balls, the 6-neighbourhood morphology), `body` (the body,
its inside, lungs a cut opened), `airways` (the trachea and main bronchi), `selection` (which
air is lung, which is gas), `filling` (each side's closings, envelope and enclosed tissue),
`masses` (the apex rule, the mass rims, pockets and balls, the hazy masses), `refine` (back to the
source grid) with `small_nodules` (a 3 mm nodule's base); `thresholds` holds the HU thresholds they
share.

Where it still fails (benchmarks/lung_mask.py: 98 lesions implanted into varied copies of a real
chest CT, eight draws; every draw changed in the fifteenth session, when the airways stopped staying
in about a quarter of the varied bases' masks, in the sixteenth, when the junction rule changed the
bases' masks by 0.02-0.25 %, and in the thirty-third, when the airway stopped taking lung beside the
bronchi: the lesions are placed in them; 784 of 784 kept since the small cores' bases, and 56 of 56
35 mm masses and 70 of 70 3 mm nodules of fresh draws): a nodule of 3 mm radius whose core is no
compact blob (one component with a vessel running into it: longer than 10 mm, or filling under 0.4
of its box) would still lose the 1-3 voxels of its base against the wall (`small_nodules`; none has
in these draws; before that rule two bases missed, 88.5-88.9 %). A mass in a concave mediastinal
dent deeper than the small mass tier's 6 mm rim loses its medial part when it is too small for a
large core (74–89 % of 10 mm masses without that tier); a large one there or on the liver dome keeps
it as the rest of its ball (84.1 and 88.7 % before the mass balls, 96.6 and 99.9 % with them), but a
mass that is no ball (flat, or lobulated beyond the misfit allowed) gets none. The large ball and
the mass rims also take in the parts of mediastinal structures that bulge into a lung (the
descending aorta and arch, the hilum, the oesophagus) and the edge of the liver dome: the mask is
1.05–1.08 × a plain air envelope with 6.0–8.5 % soft tissue (the old 15 mm mask: 4.7 %); beside a 35
mm mass the rims, envelope, pockets and balls take in up to 2.75 % of the lung mask's volume outside
the lesion (the pockets' share up to 0.9 %, such as paravertebral tissue within `POCKET_DEPTH_MM` of
the hull's edge beside a mass against the spine; the balls' up to 0.7 %, 22–35 ml of mediastinum or
liver inside a ball fitted a little larger than the mass; the hazy masses' under 0.1 %, a
ground-glass mass's blurred edge). Where the lungs meet, the closing that sees lung beyond the split
takes in the tissue between them within the junction's gap (the junction line, anterior mediastinal
fat), and where that gap is 12 mm or wider the mass rim may take it for a mass and add its rim:
together 0.02-0.25 % of a varied real base's mask, up to 10 ml (it keeps a 10 mm nodule lying across
the junction, which the split cut to 54 and 70 % before: 97.2 and 99.7 % on those cases). Lungs
touching at the anterior junction stay one component. Bilateral apical tumours defeat the mirror
rule, and so would lungs of very unequal width (the mirror plane lies halfway between their
outermost voxels). A small air pocket outside the lungs that reads hazier than `GROUND_GLASS_MIN_HU`
on the coarse grid (a nearly collapsed oesophagus) and touches them would be taken in as ground
glass. A trachea whose lumen reads lighter than `AIRWAY_LUMEN_MEDIAN_HU` below darker top slices (a
noisy low-dose scan) is removed only down to where it turns light, the rest kept as lung (a review's
constructed case; growing the median test only where the air grows mended it but let lung beside the
bronchi into the airway again in a tenth of the demo-size phantoms). Scans without much lung (an
abdominal CT reaching the lung bases) fail the plausibility bounds unless `litres` is widened. A
lung that the image's edge or the field of view cuts open (`benchmarks/lung_mask.py --cuts`: the
real CT cropped 10-40 mm into a lung, 15 mm front or back, or inside a circle cutting the right
lung) keeps 98-99 % of the uncut scan's mask (19-85 % before `body.cut_open_lungs`, which took in up
to 383 ml); the rest is mediastinal tissue the uncut mask's envelope took in, and with the field of
view read as plain air, the lung beyond the chord of the body's hull. Such a mask takes in 3-22 ml
beyond the uncut one (tissue at the cut and the mediastinum); where the cut is at a lung's outermost
column there is no mirror plane, the split lies at the trachea and the apex rule is skipped; a lung
cut open in every one of its slices is still lost.

Measured (CPU seconds on one core of a shared machine, 2026-12-01, at commit 84df5ad, before the
ground-glass pockets and the protruding cores' fringe): 0.54 s for the real 191×167×233 chest CT at
1.5 mm, 0.60 s for the 200×512×512 benchmark phantom (0.88 and 1.03 s before the speed-up of the
same rules); about half of it is the closings' distance transforms, which run (with the block
means) in `threads` threads; with two or more, the two sides are filled side by side (0.78–0.85 →
0.67–0.69 s warm on the benchmark phantom, an Intel Xeon, 2026-12-02: the same masks, voxel for
voxel); the full-resolution pass runs in z-slabs side by side, each with the slices its rules reach
(0.14 → 0.08 s warm on the benchmark phantom, AMD EPYC, 2026-12-02: the same masks). Where the
lungs meet, each side's 15 mm closing runs apart from the envelope's (its own distance transforms):
+0.05 s CPU on the real chest CT (0.79 → 0.84 s, one core); none on the benchmark phantom, whose
lungs never meet. The apex rule's depth transform covers only the slices it can reach, and the
full-resolution pass only the box of the coarse result (`segment_lungs_in_box`).
"""

from kdsb.preprocessing.lungs.segment import (
    lung_bounding_box,
    mask_on_box,
    segment_lungs,
    segment_lungs_in_box,
)
from kdsb.preprocessing.lungs.thresholds import AIR_THRESHOLD_HU

__all__ = [
    "AIR_THRESHOLD_HU",
    "lung_bounding_box",
    "mask_on_box",
    "segment_lungs",
    "segment_lungs_in_box",
]
