{{/*
Names are chart-prefixed and truncated to 63 characters (the DNS label limit of Kubernetes names).
*/}}
{{- define "puzzle.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "puzzle.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A fullname with a suffix, still within 63 characters (the suffix is kept whole). */}}
{{- define "puzzle.suffixed" -}}
{{- $suffix := .suffix -}}
{{- $base := include "puzzle.fullname" .root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end }}

{{- define "puzzle.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "puzzle.selectorLabels" -}}
app.kubernetes.io/name: {{ include "puzzle.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "puzzle.labels" -}}
helm.sh/chart: {{ include "puzzle.chart" . }}
{{ include "puzzle.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: puzzle
{{- end }}

{{- define "puzzle.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "puzzle.suffixed" (dict "root" . "suffix" "workflow")) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "puzzle.semaphoreName" -}}
{{- include "puzzle.suffixed" (dict "root" . "suffix" "semaphore") }}
{{- end }}

{{- define "puzzle.artifactRepositoryName" -}}
{{- if .Values.artifactRepository.create }}
{{- include "puzzle.suffixed" (dict "root" . "suffix" "artifact-repository") }}
{{- else }}
{{- required "artifactRepository.existingConfigMap is required when artifactRepository.create is false" .Values.artifactRepository.existingConfigMap }}
{{- end }}
{{- end }}

{{/*
REPOSITORY:TAG of one image; .kind is "gpu" or "cpu". No image is published and no registry is assumed,
so an empty repository fails the render rather than giving pods that sit in ImagePullBackOff.
*/}}
{{- define "puzzle.image" -}}
{{- $image := index .root.Values.image .kind -}}
{{- $repository := required (printf "image.%s.repository is empty: set it to the repository you pushed images/Dockerfile.%s to (no registry is assumed), e.g. --set image.%s.repository=REGISTRY/puzzle-%s" .kind .kind .kind .kind) $image.repository -}}
{{- printf "%s:%s" $repository (default .root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/* The shipped WorkflowTemplate, parsed as data: Helm never evaluates the Argo expressions inside it. */}}
{{- define "puzzle.workflowTemplateFile" -}}
{{- .Files.Get "files/workflowtemplate.yaml" }}
{{- end }}
